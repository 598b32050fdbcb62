"""Greedy argmax of a decode step's logits: the split kernel beside ``torch.argmax``.

    python benchmarks/greedy_argmax.py --rows 1,4,16 --json argmax.json

Each call is timed in a CUDA graph (``triton.testing.do_bench_cudagraph``, median), so the
figure is the GPU's time, not the host's launch: in the engine the argmax is launched while
the step's graph runs. Fp32 logits of Llama 3's 128,256-token vocabulary, fresh per row
count; the anchor is ``torch.argmax`` on the same tensor, in the same run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton

from neuron_llm.backends.cuda.argmax import argmax
from neuron_llm.bench.anchors import require_cuda


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,4,16")
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--rep-ms", type=int, default=200)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    require_cuda("greedy_argmax.py")
    results = []
    for rows in (int(r) for r in args.rows.split(",")):
        logits = torch.randn(rows, args.vocab, device="cuda", generator=torch.Generator("cuda").manual_seed(rows))
        assert torch.equal(argmax(logits), logits.argmax(dim=-1))
        ours, torchs = (
            1e3 * triton.testing.do_bench_cudagraph(fn, rep=args.rep_ms, return_mode="median")
            for fn in (lambda: argmax(logits), lambda: logits.argmax(dim=-1))
        )
        results.append({"rows": rows, "vocab": args.vocab, "split_us": ours, "torch_us": torchs})
        print(json.dumps(results[-1]), flush=True)
    print(f"\n{torch.cuda.get_device_name()}, fp32 logits, vocab {args.vocab}\n")
    print("| rows | split argmax | torch.argmax | speed-up |\n|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['rows']} | {r['split_us']:.1f} us | {r['torch_us']:.1f} us | {r['torch_us'] / r['split_us']:.2f}x |"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

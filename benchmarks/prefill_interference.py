"""Engine steps while prompts keep arriving into a running decode, on a GPU.

    python benchmarks/prefill_interference.py --repeats 2 --json prefill_interference.json
    python benchmarks/prefill_interference.py --max-prefill-graph-tokens 0   # prefills eager

One request decodes for ``--steps`` steps; every 10th step (from the 5th) a request of a
``--prompt-len``-token prompt and 4 output tokens arrives, so every 10th step carries a
prefill beside the decodes (from its bucket's CUDA graph, or eagerly past
``max_prefill_graph_tokens``). Reported per repeat: the wall time of the ``--steps``
``LLMEngine.step`` calls, the median call (a decode step, the anchor), the median of the calls
that take a new prompt (how long the host is held around a prefill) and the largest.
Deterministic arrivals, so two code states can be compared run for run. Llama-3-8B shape,
random bf16 weights (``neuron_llm.bench.engine``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from neuron_llm.bench import engine as bench
from neuron_llm.bench.anchors import require_cuda
from neuron_llm.config import DeviceConfig
from neuron_llm.sampling_params import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--num-layers", type=int, default=None)
    parser.add_argument("--max-prefill-graph-tokens", type=int, default=DeviceConfig.max_prefill_graph_tokens)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    require_cuda("prefill_interference.py")
    _, config = bench.llama3_8b_shape(args.num_layers)
    engine = bench.EngineCase(
        lambda: bench.random_llama(config, torch.bfloat16, "cuda"),
        config,
        max_prefill_graph_tokens=args.max_prefill_graph_tokens,
    ).engine()
    num_arrivals = args.steps // 10
    prompts = bench.random_prompts(num_arrivals + 1, args.prompt_len, config.vocab_size, seed=3)
    print(
        f"{torch.cuda.get_device_name()}, {args.prompt_len}-token prompts arriving every 10 steps, "
        f"prefill graphs up to {args.max_prefill_graph_tokens} tokens"
    )
    results: list[dict[str, float]] = []
    for repeat in range(args.repeats):
        engine.add_request(prompts[-1], SamplingParams(max_tokens=args.steps + 20, ignore_eos=True, temperature=0.0))
        times, prefill_times = [], []
        start = time.perf_counter()
        for i in range(args.steps):
            arrives = i % 10 == 5
            if arrives:
                engine.add_request(prompts[i // 10], SamplingParams(max_tokens=4, ignore_eos=True, temperature=0.0))
            step_start = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - step_start)
            if arrives:
                prefill_times.append(times[-1])
        total = time.perf_counter() - start
        while engine.has_unfinished_requests():
            engine.step()
        results.append(
            {
                "repeat": repeat,
                "total_ms": total * 1e3,
                "median_ms": statistics.median(times) * 1e3,
                "prefill_step_median_ms": statistics.median(prefill_times) * 1e3,
                "max_ms": max(times) * 1e3,
            }
        )
        print(json.dumps(results[-1]), flush=True)
    print(f"\n| repeat | {args.steps} steps | step() median | prefill step() median | ratio | largest |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in results:
        prefill = r["prefill_step_median_ms"]
        print(
            f"| {r['repeat']} | {r['total_ms']:.0f} ms | {r['median_ms']:.2f} ms | {prefill:.2f} ms "
            f"| {prefill / r['median_ms']:.1f}x | {r['max_ms']:.1f} ms |"
        )
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "device": torch.cuda.get_device_name(),
                    "max_prefill_graph_tokens": args.max_prefill_graph_tokens,
                    "runs": results,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()

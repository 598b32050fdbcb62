"""What sampling adds to a decode step on the GPU, beside the step's own floor.

    python benchmarks/sampler_cost.py --batches 1,4,8,64 --json sampler.json

Fp32 logits of Llama 3's 128,256-token vocabulary, normal with standard deviation 3 (a
spread like a trained model's), ``SamplingBatch`` built beforehand as the engine builds it:

- ``sample`` for each setting below (penalties aside, every stage the engine runs after the
  model), through the reference backend (top-k by ``torch.topk`` selection, top-p alone by
  sorting the vocabulary) and the cuda backend (its truncation kernels and its one-pass
  draw), each the median time a call takes in a loop of 20 (CUDA events; host launches
  included where they bound it);
- the truncation alone in a CUDA graph (the GPU's time only): the sort of every row against
  the cuda backend's kernels (top-k settings: ``torch.topk`` and ``truncation.top_k_top_p``;
  top-p alone: ``truncation.top_p``), with the number of rows whose
  kept tokens differ from the sort's (the sort keeps or drops tokens tied at a threshold in
  its sort's order, the others keep them all; and they sum the mass in different orders).

The anchor, from the same run: Llama-3-8B's batch-1 bf16 decode floor, 16.06 GB of weights
over the copy bandwidth.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import torch
import triton

from neuron_llm import ops
from neuron_llm.backends.cuda import truncation
from neuron_llm.backends.truncation import sort_top_k_top_p
from neuron_llm.bench.anchors import copy_bandwidth, require_cuda, time_cuda
from neuron_llm.sample.sampler import RowState, SamplingBatch, sample
from neuron_llm.sampling_params import SamplingParams

LLAMA3_8B_WEIGHT_BYTES = 16.06e9
SETTINGS = {
    "greedy": {"temperature": 0.0},
    "temperature 0.7": {"temperature": 0.7},
    "top-p 0.9": {"temperature": 0.7, "top_p": 0.9},
    "top-k 50": {"temperature": 0.7, "top_k": 50},
    "top-k 50, top-p 0.9": {"temperature": 0.7, "top_k": 50, "top_p": 0.9},
    "min-p 0.05": {"temperature": 0.7, "min_p": 0.05},
}
CALLS = 20


def sample_us(logits: torch.Tensor, batch: SamplingBatch, backend: str) -> float:
    ops.use_backend(backend)
    return 1e6 * time_cuda(lambda: [sample(logits, batch) for _ in range(CALLS)], repeats=5) / CALLS


def truncation_us(logits: torch.Tensor, batch: SamplingBatch) -> dict[str, float | int]:
    """GPU microseconds of the truncation alone, the sort's and ours, and the rows where they differ."""
    sort = functools.partial(sort_top_k_top_p, logits, batch.top_k, batch.top_p)
    if batch.top_k is None:
        ours = functools.partial(truncation.top_p, logits, batch.top_p)
    else:
        ours = functools.partial(truncation.top_k_top_p, logits, batch.top_k, batch.top_p, batch.top_k_bound)
    bench = triton.testing.do_bench_cudagraph
    return {
        "sort_graph_us": 1e3 * bench(sort, rep=100, return_mode="median"),
        "ours_graph_us": 1e3 * bench(ours, rep=100, return_mode="median"),
        "rows_unlike_sort": int((sort().isinf() != ours().isinf()).any(dim=-1).sum()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,4,8,64")
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    require_cuda("sampler_cost.py")
    device = torch.device("cuda")
    floor_us = 1e6 * LLAMA3_8B_WEIGHT_BYTES / copy_bandwidth(device)
    results = []
    for num_rows in (int(b) for b in args.batches.split(",")):
        generator = torch.Generator(device).manual_seed(num_rows)
        logits = 3 * torch.randn(num_rows, args.vocab, device=device, generator=generator)
        for name, settings in SETTINGS.items():
            rows = [RowState(SamplingParams(**settings), [1], []) for _ in range(num_rows)]
            batch = SamplingBatch.build(rows, args.vocab, device)
            result = {"batch": num_rows, "setting": name}
            result["sample_torch_us"] = sample_us(logits, batch, "torch")
            result["sample_cuda_us"] = sample_us(logits, batch, "cuda")
            if batch.top_k is not None or batch.top_p is not None:
                result.update(truncation_us(logits, batch))
            results.append(result)
            print(json.dumps(result), flush=True)
    print(f"\n{torch.cuda.get_device_name()}; batch-1 bf16 decode floor {floor_us / 1e3:.2f} ms; fp32 logits\n")
    print("| batch | setting | sample(), reference | sample(), cuda | truncation: sort | ours | rows unlike sort |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in results:
        torch_us, cuda_us = r["sample_torch_us"], r["sample_cuda_us"]
        graph = "- | - | -"
        if "sort_graph_us" in r:
            graph = f"{r['sort_graph_us']:.0f} us | {r['ours_graph_us']:.0f} us | {r['rows_unlike_sort']}"
        print(
            f"| {r['batch']} | {r['setting']} | {torch_us:.0f} us ({100 * torch_us / floor_us:.1f}%)"
            f" | {cuda_us:.0f} us ({100 * cuda_us / floor_us:.1f}%) | {graph} |"
        )
    print("\n(percentages: of the batch-1 decode floor; ours: the cuda backend's truncation kernels)")
    if args.json is not None:
        args.json.write_text(json.dumps({"floor_us": floor_us, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Where a batch-1 decode step's GPU time goes, kernel by kernel, on the Llama-3-8B shape.

    python benchmarks/decode_profile.py --formats bf16,int8 --json decode_profile.json

For each weight format, the engine's worker runs one decode step (CUDA graph replayed, greedy
token read back) under ``torch.profiler``. Reported per step: the GPU span (first kernel's
start to the last one's end), the sum of kernel times, the idle time between kernels (span
minus busy), the kernel count, and the kernels grouped by name with their count and time.
Beside them, from the same run: the weight bytes over the copy bandwidth (the floor) and
the host's wall time per step; a Markdown table of it all prints last. Format
``bf16-cublas`` is bf16 with every 16-bit linear on cuBLAS, the backend's choice before the
streaming GEMV took single rows. Needs a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from neuron_llm.backends.cuda.backend import CudaBackend
from neuron_llm.backends.torch_backend import TorchBackend
from neuron_llm.bench import anchors, engine
from neuron_llm.quant import quantize_model


def profile_steps(worker: Any, step: Any, repeats: int) -> list[dict[str, Any]]:
    """One profile per step: its kernels as (name, start us, end us), sorted by start."""
    steps = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            worker.execute(step)[0].argmax().item()
            torch.cuda.synchronize()
        kernels = [
            (e.name, e.time_range.start, e.time_range.end)
            for e in prof.events()
            if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start
        ]
        kernels.sort(key=lambda k: k[1])
        steps.append(summarize(kernels))
    return steps


def summarize(kernels: list[tuple[str, float, float]]) -> dict[str, Any]:
    span = kernels[-1][2] - kernels[0][1]
    busy = sum(end - start for _, start, end in kernels)
    by_name: dict[str, list[float]] = defaultdict(list)
    for name, start, end in kernels:
        by_name[name[:80]].append(end - start)
    groups = sorted(((sum(t), len(t), n) for n, t in by_name.items()), reverse=True)
    return {
        "span_us": span,
        "busy_us": busy,
        "idle_us": span - busy,
        "num_kernels": len(kernels),
        "kernels": [{"name": n, "count": c, "total_us": t} for t, c, n in groups],
    }


def markdown_table(results: dict[str, Any], formats: list[str], top: int) -> str:
    """Each format's step beside its floor, then its costliest kernel groups."""
    lines = [
        f"copy bandwidth {results['copy_bandwidth_Bps'] / 1e12:.2f} TB/s; context {results['context']} tokens",
        "",
        "| format | worker step (us) | floor (us) | step / floor | GPU span (us) | kernel time (us) | kernels |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for fmt in formats:
        r = results[fmt]
        lines.append(
            f"| {fmt} | {r['wall_us']:.0f} | {r['floor_us']:.0f} | {r['wall_us'] / r['floor_us']:.2f}x "
            f"| {r['span_us']:.0f} | {r['busy_us']:.0f} | {r['num_kernels']} |"
        )
    lines += ["", "| format | kernel | count | time (us) |", "|---|---|---:|---:|"]
    for fmt in formats:
        lines += [
            f"| {fmt} | {k['name']} | {k['count']} | {k['total_us']:.1f} |" for k in results[fmt]["kernels"][:top]
        ]
    return "\n".join(lines)


@contextlib.contextmanager
def cublas_linears() -> Any:
    """Every 16-bit linear of the cuda backend on cuBLAS while the context lasts."""
    linear = CudaBackend.linear
    CudaBackend.linear = TorchBackend.linear
    try:
        yield
    finally:
        CudaBackend.linear = linear


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--formats", default="bf16,int8", help="bf16, bf16-cublas or quantization presets, comma-separated"
    )
    parser.add_argument("--num-layers", type=int, default=None)
    parser.add_argument("--context", type=int, default=192, help="tokens in the sequence's cache")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--top", type=int, default=14, help="kernel groups printed per format")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("decode_profile.py measures a GPU: no CUDA device is visible")

    _, model_config = engine.llama3_8b_shape(args.num_layers)
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "context": args.context,
        "copy_bandwidth_Bps": anchors.copy_bandwidth(),
    }
    for fmt in args.formats.split(","):
        with engine.released(), cublas_linears() if fmt == "bf16-cublas" else contextlib.nullcontext():

            def build(fmt: str = fmt) -> Any:
                model = engine.random_llama(model_config, torch.bfloat16, "cuda")
                if not fmt.startswith("bf16"):
                    quantize_model(model, fmt)
                return model

            llm = engine.EngineCase(build, model_config).engine()
            worker = llm.runner.executor.worker
            step = engine.decode_step_input(llm, args.context)
            wall = engine.worker_decode_time(llm, args.context)
            steps = profile_steps(worker, step, args.repeats)
            median = sorted(steps, key=lambda s: s["span_us"])[len(steps) // 2]
            floor_us = 1e6 * worker.weight_bytes / results["copy_bandwidth_Bps"]
            results[fmt] = {**median, "wall_us": 1e6 * wall, "weight_bytes": worker.weight_bytes, "floor_us": floor_us}
            print(
                f"\n{fmt}: wall {1e6 * wall:.0f} us, GPU span {median['span_us']:.0f} us, busy {median['busy_us']:.0f},"
                f" idle {median['idle_us']:.0f} ({median['num_kernels']} kernels); floor {floor_us:.0f} us"
            )
            for k in median["kernels"][: args.top]:
                print(f"  {k['total_us']:8.1f} us  {k['count']:4d}x  {k['name']}")
            del llm, worker
    print()
    print(markdown_table(results, args.formats.split(","), args.top))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Prefill steps replayed from CUDA graphs against the same steps run eagerly, on a GPU.

    python benchmarks/prefill_graphs.py --formats bf16,fp8 --json prefill_graphs.json

For each weight format one engine (Llama-3-8B shape, random weights) captures a graph for
every prefill bucket up to ``--max-tokens``; each case, a prompt of N tokens (``N``) or a
chunk of N tokens after a cached context of C (``N@C``), then runs through the worker from
its graph and eagerly (``Worker.forward``, the path of steps past
``max_prefill_graph_tokens``), alternated, each timed from staging to the token on the host.
The eager step is the anchor; the logits' relative difference between the two is reported
too (0 where both run the same kernels: a whole prompt of 1,024+ tokens goes to cuDNN in
both). Then, for bf16, the memory the engine reserves after warm-up with prefill graphs up to
0 tokens, the default limit and ``--max-tokens``.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from neuron_llm.bench import engine as bench
from neuron_llm.bench.anchors import require_cuda
from neuron_llm.config import DeviceConfig
from neuron_llm.worker import Worker


def parse_case(case: str) -> tuple[int, int]:
    """``N`` -> (N, N): a whole prompt; ``N@C`` -> (C + N, N): N tokens after C cached ones."""
    tokens, _, context = case.partition("@")
    return int(context or 0) + int(tokens), int(tokens)


def step_times_ms(run: Callable[[], torch.Tensor], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        run()[0].argmax().item()
        times.append(1e3 * (time.perf_counter() - start))
    return times


def time_cases(fmt: str, config: Any, cases: list[str], max_tokens: int, rounds: int) -> list[dict[str, Any]]:
    build = bench.random_llama_builder(config, fmt)
    case = bench.EngineCase(build, config, max_num_batched_tokens=max_tokens, max_prefill_graph_tokens=max_tokens)
    with bench.released():
        llm = case.engine()
        worker = llm.runner.executor.worker
        results = []
        for name in cases:
            context, query_len = parse_case(name)
            step = bench.step_input(llm, context, query_len)

            graph = functools.partial(worker.execute, step)
            eager = functools.partial(Worker.forward, worker, step, step.logits_indices)
            replayed, expected = graph()[0].double(), eager()[0].double()
            difference = ((replayed - expected).norm() / expected.norm()).item()
            times: dict[str, list[float]] = {"graph": [], "eager": []}
            for _ in range(rounds):
                for mode, run in (("graph", graph), ("eager", eager)):
                    times[mode] += step_times_ms(run, 5)
            graph_ms, eager_ms = (statistics.median(times[mode]) for mode in ("graph", "eager"))
            results.append(
                {
                    "format": fmt,
                    "case": name,
                    "graph_ms": graph_ms,
                    "eager_ms": eager_ms,
                    "logits_difference": difference,
                }
            )
            print(json.dumps(results[-1]), flush=True)
        del llm, worker, graph, eager
    return results


def reserved_gib(config: Any, max_prefill_graph_tokens: int, max_tokens: int) -> float:
    """GiB the caching allocator holds after a bf16 engine's warm-up (weights, KV pool, graphs)."""
    case = bench.EngineCase(
        bench.random_llama_builder(config),
        config,
        max_num_batched_tokens=max_tokens,
        max_prefill_graph_tokens=max_prefill_graph_tokens,
    )
    with bench.released():
        torch.cuda.empty_cache()  # what earlier cases left cached
        llm = case.engine()
        reserved = torch.cuda.memory_reserved() / 2**30
        del llm
    return reserved


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", default="bf16,fp8", help="bf16 or quantization presets, comma-separated")
    parser.add_argument("--cases", default="128,256,512,1024,2048,4096,256@2048,2048@6144")
    parser.add_argument("--max-tokens", type=int, default=4096, help="largest prefill bucket (and graph)")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of 5 graph and 5 eager steps")
    parser.add_argument("--num-layers", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    require_cuda("prefill_graphs.py")
    _, config = bench.llama3_8b_shape(args.num_layers)
    cases = args.cases.split(",")
    rows = [
        row for fmt in args.formats.split(",") for row in time_cases(fmt, config, cases, args.max_tokens, args.rounds)
    ]
    caps = sorted({0, DeviceConfig.max_prefill_graph_tokens, args.max_tokens})
    memory = {cap: reserved_gib(config, cap, args.max_tokens) for cap in caps}
    print(f"\n{torch.cuda.get_device_name()}; prefill buckets up to {args.max_tokens} tokens\n")
    print("| format | step (tokens, @ cached context) | graph | eager | eager / graph | logits difference |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['format']} | {r['case']} | {r['graph_ms']:.2f} ms | {r['eager_ms']:.2f} ms "
            f"| {r['eager_ms'] / r['graph_ms']:.2f}x | {r['logits_difference']:.1e} |"
        )
    print("\n| prefill graphs up to | reserved after warm-up (bf16) |\n|---:|---:|")
    for cap, gib in memory.items():
        print(f"| {cap} tokens | {gib:.2f} GiB |")
    if args.json is not None:
        summary = {"device": torch.cuda.get_device_name(), "max_tokens": args.max_tokens, "steps": rows}
        args.json.write_text(json.dumps({**summary, "reserved_gib": memory}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

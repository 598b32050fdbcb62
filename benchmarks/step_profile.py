"""Where one engine step's GPU time goes, kernel by kernel, on the Llama-3-8B shape.

    python benchmarks/step_profile.py --formats bf16,int8 --json step_profile.json
    python benchmarks/step_profile.py --prompt 4096 --formats bf16,fp8,fp8-all
    python benchmarks/step_profile.py --query 5 --formats bf16,int8     # a verification step, k = 4

For each weight format, the engine's worker runs one step of one sequence under
``torch.profiler``: a decode step at ``--context`` tokens (CUDA graph replayed, greedy token
read back), with ``--query N`` a step of N new tokens after the context (what speculative
decoding's verification of k = N - 1 proposed tokens runs), or with ``--prompt N`` the
prefill of an N-token prompt. Reported per step: the GPU span (first kernel's start to the
last one's end), the sum of kernel times, the idle time between kernels (span minus busy),
the kernel count, and the kernels grouped by name with their count and time. Beside them,
from the same run, the step's floor: for decode the weight bytes over the copy bandwidth, for
prefill the linears' FLOPs at the card's bf16 matmul rate; and the host's wall time per step.
A Markdown table of it all prints last.

A format is a weight format (``bf16`` or a quantization preset) with optional suffixes that
change one choice of the cuda backend, for an A/B in one run: ``-cublas`` puts every 16-bit
linear on cuBLAS (before the streaming GEMV took single rows), ``-norm-apart`` runs each
RMSNorm apart from the linear after it (before fp8 linears quantized in the norm's pass).
``-swiglu-in-down`` makes a single row's SwiGLU in the down projection's loads (before the
gate/up GEMV stored it: 16-bit rows and int8 rows with a scale per row); ``-rope-apart`` runs a
single row's RoPE and KV-cache write in a kernel of their own (before the Q/K/V GEMV made
them); ``-norm-kernels`` adds a single row's residual and norms it in a kernel before the
gate/up and Q/K/V GEMVs (before the o and down GEMVs added it and the GEMVs after them normed
their input). ``-prompt-tiles`` runs every prefill-kernel step with a prompt's tiles and no
context split (before steps of few tokens took smaller tiles and split the context);
``-scaled-mm`` every fp8 product on ``torch._scaled_mm`` (before few rows streamed the weight).
Three more suffixes leave a decode step's small kernels out, to show what each costs in the
step and so what fusing it away could save at most: ``-skip-norms`` (every RMSNorm kernel, its
residual add too; with ``-norm-kernels`` every RMSNorm), ``-skip-rope`` (RoPE and the KV cache
write), ``-skip-attention``. Their outputs are wrong by design; they time the step without
those kernels. Needs a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from neuron_llm.backends.cuda import attention, fp8
from neuron_llm.backends.cuda.backend import CudaBackend
from neuron_llm.backends.torch_backend import TorchBackend
from neuron_llm.bench import anchors, engine
from neuron_llm.bench.anchors import require_cuda


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


def run_labels(formats: list[str]) -> list[str]:
    """Each run's name: its format, numbered from its second run on (``int8``, ``int8 (2)``), so
    that an A/B alternated in one call keeps every run's figures."""
    labels = []
    for i, fmt in enumerate(formats):
        runs = formats[: i + 1].count(fmt)
        labels.append(fmt if runs == 1 else f"{fmt} ({runs})")
    return labels


def markdown_table(results: dict[str, Any], runs: list[str], top: int) -> str:
    """Each run's step beside its floor, then its costliest kernel groups."""
    lines = [
        f"{results['step']}; copy bandwidth {results['copy_bandwidth_Bps'] / 1e12:.2f} TB/s",
        "",
        "| run | worker step (us) | floor (us) | step / floor | GPU span (us) | kernel time (us) | kernels |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        r = results[run]
        lines.append(
            f"| {run} | {r['wall_us']:.0f} | {r['floor_us']:.0f} | {r['wall_us'] / r['floor_us']:.2f}x "
            f"| {r['span_us']:.0f} | {r['busy_us']:.0f} | {r['num_kernels']} |"
        )
    lines += ["", "| run | kernel | count | time (us) |", "|---|---|---:|---:|"]
    for run in runs:
        lines += [
            f"| {run} | {k['name']} | {k['count']} | {k['total_us']:.1f} |" for k in results[run]["kernels"][:top]
        ]
    return "\n".join(lines)


VARIANTS = {
    "-cublas": lambda: mock.patch.object(CudaBackend, "linear", TorchBackend.linear),
    "-norm-apart": lambda: mock.patch.object(CudaBackend, "norm_linear", TorchBackend.norm_linear),
    "-swiglu-in-down": lambda: mock.patch.object(CudaBackend, "feed_forward", TorchBackend.feed_forward),
    "-skip-norms": lambda: mock.patch.object(CudaBackend, "rms_norm", _skip_norm),
    "-rope-apart": lambda: mock.patch.object(CudaBackend, "norm_qkv_rotary", TorchBackend.norm_qkv_rotary),
    "-norm-kernels": lambda: mock.patch.object(CudaBackend, "_adds_residual", lambda *args: False),
    "-skip-rope": lambda: _skip_rope(),
    "-skip-attention": lambda: mock.patch.object(CudaBackend, "paged_attention", _skip_to_query),
    "-prompt-tiles": lambda: _prompt_tiles(),
    "-scaled-mm": lambda: mock.patch.object(fp8, "STREAMED_MAX_ROWS", 0),
}
"""Format suffixes, each changing one choice of the cuda backend while its case runs."""


@contextlib.contextmanager
def applied(variants: list[str]) -> Iterator[None]:
    """The cuda backend with ``variants`` (suffixes of ``VARIANTS``) in force."""
    with contextlib.ExitStack() as stack:
        for variant in variants:
            stack.enter_context(VARIANTS[variant]())
        yield


@contextlib.contextmanager
def _prompt_tiles() -> Any:
    with (
        mock.patch.object(attention, "FEW_QUERY_MAX_TOKENS", 0),
        mock.patch.object(attention, "prefill_num_splits", lambda *args: 1) as no_splits,
    ):
        yield no_splits


@contextlib.contextmanager
def _skip_rope() -> Any:
    with (
        mock.patch.object(CudaBackend, "norm_qkv_rotary", TorchBackend.norm_qkv_rotary),
        mock.patch.object(CudaBackend, "rotary_write_kv", _skip_to_query) as skipped,
    ):
        yield skipped


def _skip_norm(self: Any, x: torch.Tensor, weight: Any, eps: Any, residual: Any) -> Any:
    return x, x


def _skip_to_query(self: Any, query: torch.Tensor, *args: Any) -> torch.Tensor:
    return query


def parse_format(fmt: str) -> tuple[str, list[str]]:
    """``bf16-cublas-norm-apart`` -> (``bf16``, [``-cublas``, ``-norm-apart``])."""
    variants = []
    while suffix := next((v for v in VARIANTS if fmt.endswith(v)), None):
        variants.insert(0, suffix)
        fmt = fmt[: -len(suffix)]
    return fmt, variants


def linear_flops_per_token(model: Any) -> int:
    """2 x the weights of the decoder's linears (the LM head runs on one row of a prefill)."""
    return 2 * sum(
        p.numel()
        for name, p in model.named_parameters()
        if name.startswith("model.layers.") and name.endswith(".weight") and p.dim() == 2  # not the scales
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--formats",
        default="bf16,int8",
        help=f"bf16 or quantization presets, each with optional suffixes {', '.join(VARIANTS)}; comma-separated",
    )
    parser.add_argument("--num-layers", type=int, default=None)
    parser.add_argument("--context", type=int, default=192, help="decode: tokens in the sequence's cache")
    parser.add_argument("--query", type=int, default=1, help="decode: new tokens in the step (k + 1 to verify k)")
    parser.add_argument("--prompt", type=int, default=None, help="profile the prefill of a prompt this long")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--top", type=int, default=14, help="kernel groups printed per format")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    require_cuda("step_profile.py")

    _, model_config = engine.llama3_8b_shape(args.num_layers)
    is_prefill = args.prompt is not None
    context, query_len = (args.prompt, args.prompt) if is_prefill else (args.context, args.query)
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "step": f"prefill of {context} tokens" if is_prefill else f"{query_len} new tokens at {context} tokens",
        "context": context,
        "copy_bandwidth_Bps": anchors.copy_bandwidth(),
    }
    if is_prefill:
        results["bf16_matmul_flops"] = anchors.bf16_matmul_flops()
    formats = args.formats.split(",")
    labels = run_labels(formats)
    for fmt, label in zip(formats, labels):
        base, variants = parse_format(fmt)
        with engine.released(), applied(variants):
            build = engine.random_llama_builder(model_config, base)
            llm = engine.EngineCase(build, model_config, max_num_batched_tokens=max(4096, query_len)).engine()
            worker = llm.runner.executor.worker
            step = engine.step_input(llm, context, query_len)
            wall = engine.worker_step_time(llm, context, query_len, repeats=10 if is_prefill else 50)
            steps = profile_steps(worker, step, args.repeats)
            median = sorted(steps, key=lambda s: s["span_us"])[len(steps) // 2]
            if is_prefill:
                floor_us = 1e6 * query_len * linear_flops_per_token(worker.model) / results["bf16_matmul_flops"]
            else:
                floor_us = 1e6 * worker.weight_bytes / results["copy_bandwidth_Bps"]
            results[label] = {
                **median,
                "wall_us": 1e6 * wall,
                "weight_bytes": worker.weight_bytes,
                "floor_us": floor_us,
            }
            print(
                f"\n{label}: wall {1e6 * wall:.0f} us, GPU span {median['span_us']:.0f} us,"
                f" busy {median['busy_us']:.0f}, idle {median['idle_us']:.0f} ({median['num_kernels']} kernels);"
                f" floor {floor_us:.0f} us"
            )
            for k in median["kernels"][: args.top]:
                print(f"  {k['total_us']:8.1f} us  {k['count']:4d}x  {k['name']}")
            del llm, worker
    print()
    print(markdown_table(results, labels, args.top))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

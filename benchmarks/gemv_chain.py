"""A batch-1 decode step's chain of GEMVs alone, beside the same GEMVs timed shape by shape.

    python benchmarks/gemv_chain.py --formats bf16,int8 --json gemv_chain.json
    NEURON_LLM_PDL=0 python benchmarks/gemv_chain.py     # without programmatic dependent launch

Each layer of Llama-3-8B's shape runs its four projections on one row, each reading the one
before's output, as a decode step does with every other kernel left out: QKV 4096->6144, O
(on the first 4096 of QKV's outputs), gate/up 4096->28672 storing silu(gate) * up (as the
engine runs it), down 14336->4096; and with SwiGLU made in the down projection's loads
instead ("swiglu in down"). ``--num-layers`` layers of distinct weights (32 by default: every
weight streams from memory, none is still in L2) are captured in one CUDA graph and timed as
``triton.testing.do_bench_cudagraph`` replays it. Beside it, from the same run: each shape
alone (the same kernel on the same weights, the layers' copies one after another in one
graph), their sum, and the layers' weight bytes over the copy bandwidth (the floor). The
gap between the chain and the sum is what the boundaries between different GEMVs cost.
Needs a GPU.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))

from linear_kernels import make_weights  # noqa: E402

from neuron_llm.backends.cuda.int8_matmul import gemv_16bit, int8_linear  # noqa: E402
from neuron_llm.bench import anchors  # noqa: E402
from neuron_llm.bench.anchors import require_cuda  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def project(fmt: str, x: torch.Tensor, w: dict[str, Any], **swiglu: bool) -> torch.Tensor:
    """The GEMV; ``silu_mul_input`` or ``silu_mul_output`` as keywords."""
    if fmt == "bf16":
        return gemv_16bit(x, w["weight"], **swiglu)
    return int8_linear(x, w["weight"], w["scale"], None, w["group_size"], **swiglu)


def swiglu_flags(name: str, swiglu_in_down: bool) -> dict[str, bool]:
    if name == "gate_up" and not swiglu_in_down:
        return {"silu_mul_output": True}
    return {"silu_mul_input": True} if name == "down" and swiglu_in_down else {}


def layer_step(fmt: str, h: torch.Tensor, layer: dict[str, dict[str, Any]], swiglu_in_down: bool) -> torch.Tensor:
    qkv = project(fmt, h, layer["qkv"])
    o = project(fmt, qkv[:, :4096], layer["o"])
    act = project(fmt, o, layer["gate_up"], **swiglu_flags("gate_up", swiglu_in_down))
    return project(fmt, act, layer["down"], **swiglu_flags("down", swiglu_in_down))


def graph_time_us(fn: Callable[[], object], rep_ms: int) -> float:
    return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")


def measure(fmt: str, layers: list[dict[str, dict[str, Any]]], swiglu_in_down: bool, rep_ms: int) -> dict[str, float]:
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    down_input = torch.randn(1, 28672 if swiglu_in_down else 14336, device="cuda", dtype=torch.bfloat16)

    def chain() -> None:
        h = x
        for layer in layers:
            h = layer_step(fmt, h, layer, swiglu_in_down)

    def alone(name: str) -> Callable[[], None]:
        inputs = down_input if name == "down" else x
        flags = swiglu_flags(name, swiglu_in_down)
        return lambda: [project(fmt, inputs, layer[name], **flags) for layer in layers]

    result = {"chain_us": graph_time_us(chain, rep_ms) / len(layers)}
    for name in SHAPES:
        result[f"{name}_us"] = graph_time_us(alone(name), rep_ms) / len(layers)
    result["sum_us"] = sum(result[f"{name}_us"] for name in SHAPES)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", default="bf16,int8", help="comma-separated among bf16, int8, int8-g128")
    parser.add_argument("--num-layers", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1, help="passes over each format")
    parser.add_argument("--rep-ms", type=int, default=100)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    require_cuda("gemv_chain.py")

    copy_bandwidth = anchors.copy_bandwidth()
    rows = []
    for fmt in args.formats.split(","):
        weight_fmt = "bf16-gemv" if fmt == "bf16" else fmt
        layers = [
            {name: make_weights(weight_fmt, n, k, torch.device("cuda"), torch.bfloat16, seed=4 * i + j)
             for j, (name, (n, k)) in enumerate(SHAPES.items())}
            for i in range(args.num_layers)
        ]  # fmt: skip
        layer_bytes = sum(w["bytes"] for w in layers[0].values())
        floor_us = 1e6 * layer_bytes / copy_bandwidth
        for repeat, swiglu_in_down in itertools.product(range(args.repeats), (False, True)):
            result = measure(fmt, layers, swiglu_in_down, args.rep_ms)
            row = {"format": fmt, "swiglu_in_down": swiglu_in_down, "pass": repeat, "floor_us": floor_us, **result}
            rows.append(row)
            print(
                f"{fmt}{' swiglu in down' * swiglu_in_down} pass {repeat}: chain {row['chain_us']:.1f} us/layer, alone "
                + ", ".join(f"{name} {row[f'{name}_us']:.1f}" for name in SHAPES)
                + f" (sum {row['sum_us']:.1f}); floor {floor_us:.1f}",
                flush=True,
            )
        del layers
        torch.cuda.empty_cache()

    print(f"\ncopy bandwidth {copy_bandwidth / 1e9:.0f} GB/s; {args.num_layers} layers, per layer:\n")
    print(
        "| format | SwiGLU made | pass | chain (us) | alone, summed (us) | chain / sum | floor (us) | chain / floor |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        where = "in down's loads" if r["swiglu_in_down"] else "in gate/up's store"
        print(
            f"| {r['format']} | {where} | {r['pass']} | {r['chain_us']:.1f} | {r['sum_us']:.1f} "
            f"| {r['chain_us'] / r['sum_us']:.2f}x | {r['floor_us']:.1f} | {r['chain_us'] / r['floor_us']:.2f}x |"
        )
    if args.json is not None:
        result = {"device": torch.cuda.get_device_name(), "copy_bandwidth_Bps": copy_bandwidth, "rows": rows}
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Per-token activation quantization kernels of a prefill beside the copy bandwidth and SwiGLU alone.

    python benchmarks/activation_quantize.py --json activation_quantize.json
    python benchmarks/activation_quantize.py --smoke     # tiny shapes; Triton's interpreter without a GPU

At Llama-3-8B's shapes for a 4096-token prefill (hidden 4096, intermediate 14336), times:

- ``silu_mul_quantize_fp8``: SwiGLU of the gate/up output and fp8 quantization, the down
  projection's input, as the backend runs it (default walk of the row);
- the same kernel over a sweep of row walks: one pass with the row in registers, or two
  passes in blocks, the SwiGLU values computed twice or staged between the passes (and
  each block loaded while the one before is computed); each checked bit for bit against
  the default;
- the unfused pair, ``fused.silu_mul`` then ``quantize_fp8_per_token``;
- ``quantize_fp8_per_token`` and ``rms_norm_quantize_fp8`` (with the residual add) of hidden-wide rows.

Anchors from the same run: the device-to-device copy bandwidth, and ``fused.silu_mul`` alone
(bf16 out, no reduction over the row): the memory traffic any SwiGLU kernel has. "GB/s" is
the bytes each kernel must move (inputs read once, outputs written once) over its time.
Times are medians of ``triton.testing.do_bench`` (L2 flushed before each call), by
``linear_kernels.timer``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated

import triton
from linear_kernels import timer  # this folder is on sys.path when a script in it runs

from neuron_llm.backends.cuda import fp8
from neuron_llm.backends.cuda.fused import silu_mul
from neuron_llm.bench import anchors


def walks(num_features: int, smoke: bool) -> list[fp8.RowQuantizeConfig]:
    """One pass (the row in registers) and two-pass walks, with and without staged values, and
    staged with each block loaded a block ahead."""
    if smoke:
        num_blocks = triton.cdiv(num_features, 64)
        configs = [fp8.RowQuantizeConfig(64, num_blocks, 2, stage) for stage in (False, True)]
        return configs + [fp8.RowQuantizeConfig(64, num_blocks, 2, True, prefetch=True)]
    whole = triton.next_power_of_2(num_features)
    configs = [fp8.RowQuantizeConfig(whole, 1, warps) for warps in (16, 32)]
    for block, warps in [(1024, 4), (2048, 4), (2048, 8), (4096, 8), (4096, 16)]:
        num_blocks = triton.cdiv(num_features, block)
        configs += [fp8.RowQuantizeConfig(block, num_blocks, warps, s) for s in (False, True)]
        configs.append(fp8.RowQuantizeConfig(block, num_blocks, warps, True, prefetch=True))
    return configs


def same_bits(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> bool:
    return torch.equal(a[0].view(torch.uint8), b[0].view(torch.uint8)) and torch.equal(a[1], b[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, fp16: checks that everything runs")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--rep-ms", type=int, default=100)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    is_cuda = torch.cuda.is_available()
    device = torch.device("cuda" if is_cuda else "cpu")
    dtype = torch.bfloat16 if is_cuda else torch.float16  # the interpreter's bf16 is unreliable
    tokens, hidden, intermediate = (3, 96, 200) if args.smoke else (args.tokens, 4096, 14336)
    time_us = timer(is_cuda, args.rep_ms, use_graph=False)
    generator = torch.Generator().manual_seed(0)
    gate_up = (2 * torch.randn(tokens, 2 * intermediate, generator=generator)).to(device, dtype)
    gate, up = gate_up[:, :intermediate], gate_up[:, intermediate:]
    x = torch.randn(tokens, hidden, generator=generator).to(device, dtype)
    residual = torch.randn(tokens, hidden, generator=generator).to(device, dtype)
    norm_weight = torch.ones(hidden, device=device, dtype=dtype)
    size = dtype.itemsize

    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if is_cuda else "cpu (Triton interpreter)",
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "tokens": tokens,
        "copy_bandwidth_Bps": anchors.copy_bandwidth() if is_cuda else None,
        "rows": [],
    }

    def record(name: str, fn: Callable[[], object], num_bytes: int, **extra: Any) -> None:
        elapsed = time_us(fn)
        row = {"kernel": name, "time_us": elapsed, "bytes": num_bytes, "gbps": num_bytes / elapsed / 1e3, **extra}
        results["rows"].append(row)
        print(f"{elapsed:9.1f} us {row['gbps']:7.0f} GB/s  {name} {extra or ''}", flush=True)

    swiglu_bytes = tokens * intermediate * (2 * size + 1)  # gate and up in, fp8 out
    record("silu_mul (anchor, 16-bit out)", lambda: silu_mul(gate_up), tokens * intermediate * 3 * size)
    default = fp8.silu_mul_quantize_fp8(gate_up, None)
    record(
        "silu_mul_quantize_fp8",
        lambda: fp8.silu_mul_quantize_fp8(gate_up, None),
        swiglu_bytes,
        walk=asdict(fp8.default_row_config(intermediate, True)),
    )
    record(
        "silu_mul then quantize_fp8_per_token",
        lambda: fp8.quantize_fp8_per_token(silu_mul(gate_up)),
        swiglu_bytes,
    )
    for config in walks(intermediate, args.smoke):
        out = fp8._launch_quantize_rows(gate, up, fp8.DEFAULT_ACTIVATION_SCALE_UB, config=config)
        if not same_bits(out, default):
            raise SystemExit(f"{config} gives other bits than the default walk")
        record(
            "silu_mul_quantize_fp8, swept walk",
            lambda c=config: fp8._launch_quantize_rows(gate, up, fp8.DEFAULT_ACTIVATION_SCALE_UB, config=c),
            swiglu_bytes,
            walk=asdict(config),
        )
    record("quantize_fp8_per_token (hidden)", lambda: fp8.quantize_fp8_per_token(x), tokens * hidden * (size + 1))
    record(
        "rms_norm_quantize_fp8 with residual (hidden)",
        lambda: fp8.rms_norm_quantize_fp8(x, residual, norm_weight, 1e-5),
        tokens * hidden * (3 * size + 1),
    )

    bandwidth = results["copy_bandwidth_Bps"]
    shape = f"{tokens} tokens; hidden {hidden}, intermediate {intermediate}"
    print(f"\ndevice: {results['device']}; {results['date']}; {shape}")
    if bandwidth:
        print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write)")
    print("\n| kernel | row walk | time (us) | GB/s | of copy BW |\n|---|---|---:|---:|---:|")
    for row in results["rows"]:
        walk = row.get("walk")
        described = (
            f"{walk['num_blocks']} x {walk['block']}, {walk['num_warps']} warps{', staged' if walk['stage'] else ''}"
            f"{', a block ahead' if walk['prefetch'] else ''}"
            if walk
            else ""
        )
        share = f"{1e9 * row['gbps'] / bandwidth:.0%}" if bandwidth else "-"
        print(f"| {row['kernel']} | {described} | {row['time_us']:.1f} | {row['gbps']:.0f} | {share} |")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Quantized linear kernels on a GPU: bf16 cuBLAS against the int8 Triton kernel and the fp8 path.

    python benchmarks/linear_kernels.py --json linear_kernels.json
    python benchmarks/linear_kernels.py --smoke          # tiny shapes; Triton's interpreter without a GPU

Llama-3-8B's linear shapes (QKV 4096->6144, O 4096->4096, gate/up 4096->14336 each and fused
to 28672, down 14336->4096) at M tokens in {1, 16, 64, 4096}, for each format:

- ``bf16``: ``F.linear`` (cuBLAS) on a bf16 weight;
- ``bf16-gemv``: ``gemv_16bit``, the int8 kernel's GEMV on the bf16 weight (decode rows);
- ``int8``/``int8-g128``: ``int8_linear``, per-channel or per-group-of-128 scales;
- ``fp8``: ``fp8_linear``: the per-token activation quantization kernel and ``torch._scaled_mm``
  (up to ``fp8.STREAMED_MAX_ROWS`` rows the int8 kernel's weight streaming instead);
  ``fp8-scaled-mm``: ``torch._scaled_mm`` for every row count;
- ``w8a8``: ``w8a8_linear``: the same kernel quantizing activations to int8 per token, and
  ``torch._int_mm`` on per-channel int8 weights.

Every case is checked first against a float32 reference of the same arithmetic (relative
error by norm). "time" is the median of ``triton.testing.do_bench_cudagraph``: calls replayed
from a CUDA graph, as the engine runs decode steps, rotating among enough weight copies that
no call finds its weight in L2. "eager" is the median of ``triton.testing.do_bench`` (L2
flushed before each call): it includes the host's launch work whenever that outlasts the GPU's.
Reported beside them, from the same run: the device-to-device copy bandwidth (bytes read plus
written) and the bf16 matmul rate of an 8192^3 product on random data. "weight GB/s" is the
weight's bytes over the time, the figure that decode shapes should bring near the copy
bandwidth. At M = 1, "read floor" is the least time a kernel that only reads the weight's
bytes takes in the same harness (``neuron_llm.bench.read_floor``), and the share of ours it
is: at tens of megabytes, fixed costs keep any kernel below the copy bandwidth.

A sweep of the int8 kernel's decode configurations (block sizes, warps, split K) and prefill
tiles prints next, best first per shape, so the defaults in ``int8_matmul.default_config``
can be set from one run. The Markdown table prints last; ``--json`` writes everything.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated

import triton
import triton.testing

from neuron_llm.backends.cuda import fp8
from neuron_llm.backends.cuda.fp8 import fp8_linear, quantize_fp8_per_token, quantize_int8_per_token
from neuron_llm.backends.cuda.int8_matmul import (
    Int8MatmulConfig,
    _num_sms,
    default_config,
    gemv_16bit,
    int8_linear,
    split_k_for,
)
from neuron_llm.backends.cuda.w8a8 import w8a8_linear
from neuron_llm.bench.read_floor import read_floor
from neuron_llm.quant.formats import (
    DEFAULT_ACTIVATION_SCALE_UB,
    dequantize_int8,
    quantize_fp8_activation,
    quantize_fp8_weight,
    quantize_int8,
    quantize_int8_activation,
)

LLAMA3_8B_SHAPES = {  # name: (out_features N, in_features K)
    "qkv": (6144, 4096),
    "o": (4096, 4096),
    "gate|up": (14336, 4096),
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
}
SMOKE_SHAPES = {"small": (96, 256), "odd": (48, 200)}
FORMATS = ("bf16", "bf16-gemv", "int8", "int8-g128", "fp8", "fp8-scaled-mm", "w8a8")
L2_FLUSH_BYTES = 100 * 2**20
"""Bytes that must pass between two uses of one weight copy: twice an H100's 50 MB of L2."""


@dataclass
class Row:
    shape: str
    n: int
    k: int
    m: int
    format: str
    time_us: float
    """Median of calls replayed in a CUDA graph."""
    eager_us: float
    """Median of eager calls (``do_bench``): what the host adds when nothing is captured."""
    tflops: float
    weight_gbps: float
    copy_fraction: float
    relative_error: float
    quantize_us: float | None = None
    read_floor_us: float | None = None
    """M = 1: the fastest streaming read of the weight's bytes, in the same harness."""


def timer(is_cuda: bool, rep_ms: int, use_graph: bool = True) -> Callable[[Callable[[], object]], float]:
    """Median microseconds of one call of ``fn``.

    On a GPU, ``use_graph`` replays calls captured in a CUDA graph (``do_bench_cudagraph``),
    as the engine runs decode steps: an eager call of a Triton kernel costs tens of
    microseconds of Python on the host, more than a decode GEMV takes on the GPU, and
    ``do_bench``'s events would time that host work. Otherwise ``do_bench`` (L2 flushed
    before each call). Without a GPU, the host clock.
    """

    def graph(fn: Callable[[], object]) -> float:
        return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")

    def eager(fn: Callable[[], object]) -> float:
        return 1e3 * triton.testing.do_bench(fn, warmup=max(5, rep_ms // 4), rep=rep_ms, return_mode="median")

    def cpu(fn: Callable[[], object]) -> float:
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return 1e6 * statistics.median(times)

    if not is_cuda:
        return cpu
    return graph if use_graph else eager


def measure_anchors(device: torch.device, time_us: Callable[[Callable[[], object]], float], smoke: bool) -> dict:
    """Copy bandwidth (bytes read + written) and the bf16 matmul rate, on random data."""
    copy_bytes = 2**20 if smoke else 2**31
    src = torch.randn(copy_bytes // 4, device=device)
    dst = torch.empty_like(src)
    copy_us = time_us(lambda: dst.copy_(src))
    size = 256 if smoke else 8192
    dtype = torch.float32 if smoke else torch.bfloat16
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    matmul_us = time_us(lambda: a @ b)
    return {
        "copy_gbps": 2 * copy_bytes / copy_us / 1e3,
        "copy_bytes": copy_bytes,
        "matmul_tflops": 2 * size**3 / matmul_us / 1e6,
        "matmul_size": size,
        "matmul_dtype": str(dtype),
    }


def make_weights(fmt: str, n: int, k: int, device: torch.device, dtype: torch.dtype, seed: int) -> dict[str, Any]:
    """One copy of a weight in ``fmt`` (random normal, quantized as the loaders do)."""
    generator = torch.Generator(device).manual_seed(seed)
    weight = torch.randn(n, k, generator=generator, device=device) * 0.02
    if fmt.startswith("bf16"):
        # The GEMV takes 16-bit weights only: fp16 where the run is in fp32 (the interpreter).
        weight_dtype = torch.float16 if fmt == "bf16-gemv" and dtype == torch.float32 else dtype
        return {"weight": weight.to(device=device, dtype=weight_dtype), "bytes": n * k * 2, "group_size": None}
    if fmt.startswith("int8") or fmt == "w8a8":
        group_size = 128 if fmt == "int8-g128" else None
        q, scale = quantize_int8(weight, group_size)
        return {"weight": q, "scale": scale, "group_size": group_size, "bytes": n * k + 4 * scale.numel()}
    q, scale = quantize_fp8_weight(weight)
    return {"weight": q, "scale": scale, "bytes": n * k + 4 * n}


def run_format(fmt: str, x: torch.Tensor, w: dict[str, Any], config: Int8MatmulConfig | None = None) -> torch.Tensor:
    if fmt == "bf16":
        return F.linear(x, w["weight"])
    if fmt == "bf16-gemv":
        return gemv_16bit(x.to(w["weight"].dtype), w["weight"], config=config)
    if fmt.startswith("int8"):
        return int8_linear(x, w["weight"], w["scale"], None, w["group_size"], config=config)
    if fmt == "w8a8":
        return w8a8_linear(x, w["weight"], w["scale"])
    if fmt == "fp8-scaled-mm":
        with mock.patch.object(fp8, "STREAMED_MAX_ROWS", 0):
            return fp8_linear(x, w["weight"], w["scale"], None, DEFAULT_ACTIVATION_SCALE_UB)
    return fp8_linear(x, w["weight"], w["scale"], None, DEFAULT_ACTIVATION_SCALE_UB)


def reference(fmt: str, x: torch.Tensor, w: dict[str, Any]) -> torch.Tensor:
    """float32 result of the same arithmetic (fp8: of the quantized activations and weights)."""
    if fmt.startswith("bf16"):
        return x.float() @ w["weight"].float().T
    if fmt.startswith("int8"):
        return x.float() @ dequantize_int8(w["weight"], w["scale"], torch.float32, w["group_size"]).T
    if fmt == "w8a8":
        x_q, x_scale = quantize_int8_activation(x)
        return (x_q.float() * x_scale) @ dequantize_int8(w["weight"], w["scale"], torch.float32).T
    x_q, x_scale = quantize_fp8_activation(x, DEFAULT_ACTIVATION_SCALE_UB)
    return (x_q.float() * x_scale) @ (w["weight"].float() * w["scale"]).T


def relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    return ((out.float() - expected).norm() / expected.norm()).item()


def rotating(fmt: str, n: int, k: int, ctx: dict) -> list[dict[str, Any]]:
    """Enough copies of the weight that, cycled through, none is still in L2 when its turn comes."""
    device, dtype = ctx["device"], ctx["dtype"]
    first = make_weights(fmt, n, k, device, dtype, seed=0)
    copies = 2 if device.type != "cuda" else 1 + -(-L2_FLUSH_BYTES // first["bytes"])
    return [first] + [make_weights(fmt, n, k, device, dtype, seed=i) for i in range(1, copies)]


def cycling(fn: Callable[[dict[str, Any]], object], weights: list[dict[str, Any]]) -> Callable[[], object]:
    turn = itertools.cycle(weights)
    return lambda: fn(next(turn))


def weight_read_floor_us(weights: list[dict[str, Any]], ctx: dict) -> float:
    """The read floor of one weight copy's bytes, rotating through as many buffers as copies
    (once per size: formats of equal bytes share it)."""
    num_bytes = weights[0]["bytes"]
    floors = ctx.setdefault("read_floors_us", {})
    if num_bytes not in floors:
        buffers = [torch.empty(num_bytes, dtype=torch.uint8, device=ctx["device"]) for _ in weights]
        floors[num_bytes] = read_floor(buffers, ctx["num_sms"], ctx["time_us"])[0]
    return floors[num_bytes]


def bench_case(
    name: str, n: int, k: int, m: int, fmt: str, weights: list[dict[str, Any]], args: argparse.Namespace, ctx: dict
) -> Row:
    device, dtype, time_us = ctx["device"], ctx["dtype"], ctx["time_us"]
    x = torch.randn(m, k, device=device, dtype=dtype)
    error = relative_error(run_format(fmt, x, weights[0]), reference(fmt, x, weights[0]))
    elapsed = time_us(cycling(lambda w: run_format(fmt, x, w), weights))
    eager_us = ctx["eager_time_us"](cycling(lambda w: run_format(fmt, x, w), weights))
    quantizer = {"fp8": quantize_fp8_per_token, "w8a8": quantize_int8_per_token}.get(fmt.removesuffix("-scaled-mm"))
    quantize_us = time_us(lambda: quantizer(x)) if quantizer is not None else None
    return Row(
        shape=name,
        n=n,
        k=k,
        m=m,
        format=fmt,
        time_us=elapsed,
        eager_us=eager_us,
        tflops=2 * m * n * k / elapsed / 1e6,
        weight_gbps=weights[0]["bytes"] / elapsed / 1e3,
        copy_fraction=weights[0]["bytes"] / elapsed / 1e3 / ctx["anchors"]["copy_gbps"],
        relative_error=error,
        quantize_us=quantize_us,
        read_floor_us=weight_read_floor_us(weights, ctx) if m == 1 else None,
    )


GEMV_TILES = (
    (16, 256, 4),
    (16, 512, 4),
    (32, 128, 4),
    (32, 256, 4),
    (32, 512, 4),
    (64, 128, 4),
    (64, 256, 8),
    (128, 128, 8),
    (16, 1024, 8),
    (16, 2048, 8),
)
"""(block_n, block_k, num_warps) of the M = 1 sweep; per-group scales cap block_k at the group."""
DOT_TILES = {
    16: (
        (16, 32, 128, 4),
        (16, 64, 128, 4),
        (16, 64, 256, 4),
        (16, 128, 128, 4),
        (16, 32, 256, 4),
        (16, 32, 512, 4),
        (16, 64, 512, 4),
        (16, 128, 256, 8),
    ),
    64: ((64, 64, 128, 4), (32, 64, 128, 4), (16, 64, 128, 4), (64, 128, 64, 4)),
}
"""(block_m, block_n, block_k, num_warps) of the small-M sweeps, by the largest M they serve."""
PREFILL_TILES = (
    (128, 128, 64, 8, 4),
    (128, 256, 64, 8, 3),
    (128, 128, 128, 8, 3),
    (256, 128, 64, 8, 3),
    (128, 128, 64, 4, 4),
)
"""(block_m, block_n, block_k, num_warps, num_stages) of the prefill sweep."""


def decode_sweep_configs(m: int, group_size: int | None, smoke: bool, weight_bytes: int) -> list[Int8MatmulConfig]:
    if smoke:
        return [Int8MatmulConfig(block_m=1 if m == 1 else 16, block_n=32, block_k=64)]
    if m == 1:
        # 16-bit weights: tiles half as deep, the same bytes a step. Per-group scales: tiles a
        # group deep, and deeper ones whose threads scale their sums group by group.
        configs = [
            Int8MatmulConfig(block_m=1, block_n=n, block_k=min(k // weight_bytes, group_size or k), num_warps=w)
            for n, k, w in GEMV_TILES
        ]
        if group_size is not None and group_size % 16 == 0:
            configs += [Int8MatmulConfig(block_m=1, block_n=n, block_k=k, num_warps=w) for n, k, w in GEMV_TILES]
        # The other conversions, an accumulator per weight element, the loop's pipelining and
        # the prefetch (with each conversion, and in the form the default gives it), each
        # against the plain form once.
        plain = Int8MatmulConfig(block_m=1, block_n=32, block_k=256 // weight_bytes)
        configs += [replace(plain, convert=c) for c in ("cvt", "add")]
        configs += [replace(plain, reduce_in_thread=False), replace(plain, num_stages=1)]
        configs += [replace(configs[i], prefetch=True, convert=c) for i in (0, 3, 5) for c in ("add", "prmt")]
        configs += [replace(configs[i], prefetch=True, convert="add", reduce_in_thread=False) for i in (0, 3, 5)]
        return configs
    tiles = DOT_TILES[16 if m <= 16 else 64]
    return [
        Int8MatmulConfig(block_m=bm, block_n=n, block_k=min(k, group_size or k), num_warps=w) for bm, n, k, w in tiles
    ]


def prefill_sweep_configs(smoke: bool) -> list[Int8MatmulConfig]:
    if smoke:
        return [Int8MatmulConfig(block_m=32, block_n=32, block_k=32)]
    return [
        Int8MatmulConfig(block_m=bm, block_n=bn, block_k=bk, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in PREFILL_TILES
    ]


def sweep_candidates(
    m: int, n: int, k: int, group_size: int | None, num_sms: int, smoke: bool, weight_bytes: int = 1
) -> list[Int8MatmulConfig]:
    """Prefill tiles for large M; decode tiles for small M, K split for 1 and 2 programs per
    multiprocessor (up to 64 rows), 2 and 4 (up to 16), or 1, 2 and 4 (one row)."""
    if m > 64:
        return prefill_sweep_configs(smoke)
    configs = []
    programs_per_sm = (1, 2) if m > 16 else (1, 2, 4) if m == 1 else (2, 4)
    for config in decode_sweep_configs(m, group_size, smoke, weight_bytes):
        num_tiles = triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)
        splits = {split_k_for(num_tiles, triton.cdiv(k, config.block_k), num_sms, p) for p in programs_per_sm}
        configs += [Int8MatmulConfig(**{**asdict(config), "split_k": s}) for s in sorted(splits)]
    return list(dict.fromkeys(configs))


def sweep_case(
    name: str, m: int, fmt: str, weights: list[dict[str, Any]], num_sms: int, args: argparse.Namespace, ctx: dict
) -> list[dict[str, Any]]:
    n, k = weights[0]["weight"].shape
    group_size = weights[0]["group_size"]
    weight_bytes = weights[0]["weight"].element_size()
    time_us = ctx["sweep_time_us"]
    x = torch.randn(m, k, device=ctx["device"], dtype=ctx["dtype"])
    expected = reference(fmt, x, weights[0])
    timed = []
    for config in sweep_candidates(m, n, k, group_size, num_sms, args.smoke, weight_bytes):
        error = relative_error(run_format(fmt, x, weights[0], config), expected)
        if not error < 1e-2:
            print(f"  {name} M={m} {fmt} {_describe(config)}: relative error {error:.2e}, left out", flush=True)
            continue
        timed.append((time_us(cycling(lambda w, c=config: run_format(fmt, x, w, c), weights)), config))
    timed.sort(key=lambda item: item[0])
    default = default_config(m, n, k, group_size, num_sms, x.dtype, weight_bytes)
    default_us = time_us(cycling(lambda w: run_format(fmt, x, w, default), weights))
    print(f"\nsweep {name} N={n} K={k} M={m} {fmt}: default {default_us:.1f} us ({_describe(default)})")
    for elapsed, config in timed[: args.sweep_top]:
        print(f"  {elapsed:8.1f} us  {weights[0]['bytes'] / elapsed / 1e3:7.0f} GB/s  {_describe(config)}", flush=True)
    case = {"shape": name, "n": n, "k": k, "m": m, "format": fmt}
    return [{**case, "time_us": t, "config": asdict(c)} for t, c in timed] + [
        {**case, "time_us": default_us, "config": asdict(default), "is_default": True}
    ]


def sweep(args: argparse.Namespace, ctx: dict) -> list[dict[str, Any]]:
    """Time the streaming kernel over tile shapes, warps and split K; print the best per case."""
    device = ctx["device"]
    ctx["sweep_time_us"] = timer(device.type == "cuda", args.sweep_rep_ms)
    num_sms = ctx["num_sms"]
    all_shapes = SMOKE_SHAPES if args.smoke else LLAMA3_8B_SHAPES
    results = []
    for name in list(all_shapes) if args.smoke else args.sweep_shapes.split(","):
        n, k = all_shapes[name]
        for fmt in args.sweep_formats.split(","):
            weights = rotating(fmt, n, k, ctx)
            for m in args.sweep_m if fmt.startswith("int8") else [1]:  # the 16-bit GEMV serves one row
                results += sweep_case(name, m, fmt, weights, num_sms, args, ctx)
            del weights
    return results


def _describe(config: Int8MatmulConfig) -> str:
    return (
        f"m{config.block_m} n{config.block_n} k{config.block_k} split{config.split_k} "
        f"w{config.num_warps} s{config.num_stages} {config.convert}"
        f"{'' if config.reduce_in_thread else ' acc-per-element'}{' prefetch' if config.prefetch else ''}"
    )


def markdown_table(rows: list[Row], anchors: dict) -> str:
    lines = [
        (
            f"copy bandwidth {anchors['copy_gbps']:.0f} GB/s (read + write), "
            f"{anchors['matmul_dtype']} {anchors['matmul_size']}^3 matmul {anchors['matmul_tflops']:.0f} TFLOP/s"
        ),
        "",
        (
            "| shape | N x K | M | format | time (us) | TFLOP/s | weight GB/s | of copy BW | read floor (us) "
            "| activation quantize (us) | eager (us) | rel. error |"
        ),
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        quantize = "-" if r.quantize_us is None else f"{r.quantize_us:.1f}"
        floor = "-" if r.read_floor_us is None else f"{r.read_floor_us:.1f} ({r.read_floor_us / r.time_us:.0%})"
        lines.append(
            f"| {r.shape} | {r.n}x{r.k} | {r.m} | {r.format} | {r.time_us:.1f} | {r.tflops:.1f} | {r.weight_gbps:.0f} "
            f"| {r.copy_fraction:.0%} | {floor} | {quantize} | {r.eager_us:.1f} | {r.relative_error:.1e} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, fp32: checks that everything runs")
    parser.add_argument("--m", default="1,16,64,4096", help="comma-separated token counts")
    parser.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated among {', '.join(FORMATS)}")
    parser.add_argument("--shapes", default=None, help=f"comma-separated among {', '.join(LLAMA3_8B_SHAPES)}")
    parser.add_argument("--sweep-m", default="1,16,64,4096", help="token counts of the int8 sweep; empty: no sweep")
    parser.add_argument("--sweep-shapes", default="gate|up,down", help="shapes of the int8 sweep")
    parser.add_argument("--sweep-formats", default="int8,int8-g128", help="among int8, int8-g128, bf16-gemv")
    parser.add_argument("--sweep-top", type=int, default=8, help="configurations printed per swept case")
    parser.add_argument("--sweep-rep-ms", type=int, default=25, help="do_bench's timing budget per swept config")
    parser.add_argument("--rep-ms", type=int, default=100, help="do_bench's timing budget per measurement")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    is_cuda = torch.cuda.is_available()
    device = torch.device("cuda" if is_cuda else "cpu")
    if args.smoke:
        args.m, args.sweep_m = "1,4,32", args.sweep_m and "1,32"
    ms = [int(m) for m in args.m.split(",") if m]
    args.sweep_m = [int(m) for m in args.sweep_m.split(",") if m]
    formats = [f for f in args.formats.split(",") if f]
    all_shapes = SMOKE_SHAPES if args.smoke else LLAMA3_8B_SHAPES
    shapes = {name: all_shapes[name] for name in (args.shapes.split(",") if args.shapes else all_shapes)}
    if is_cuda and torch.cuda.get_device_capability(device) < (8, 9):
        formats = [f for f in formats if not f.startswith("fp8")]
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 references in float32
    torch.manual_seed(0)

    time_us = timer(is_cuda, args.rep_ms)
    ctx: dict[str, Any] = {"device": device, "dtype": torch.float32 if args.smoke and not is_cuda else torch.bfloat16}
    ctx["time_us"] = time_us
    ctx["num_sms"] = _num_sms(device)
    ctx["eager_time_us"] = timer(is_cuda, args.rep_ms, use_graph=False)
    ctx["anchors"] = measure_anchors(device, ctx["eager_time_us"], args.smoke)
    described = torch.cuda.get_device_name(device) if is_cuda else f"CPU ({platform.machine()}), Triton interpreter"
    print(f"device: {described}; torch {torch.__version__}, triton {triton.__version__}", flush=True)
    print(json.dumps(ctx["anchors"]), flush=True)

    rows = []
    for name, (n, k) in shapes.items():
        for fmt in formats:
            if fmt.startswith("fp8") and (n % 16 or k % 16):
                print(f"{name}: fp8 needs N and K divisible by 16, skipped", flush=True)
                continue
            weights = rotating(fmt, n, k, ctx)
            for m in ms:
                row = bench_case(name, n, k, m, fmt, weights, args, ctx)
                print(json.dumps(asdict(row)), flush=True)
                rows.append(row)
            del weights

    sweep_results = sweep(args, ctx) if args.sweep_m else []
    print()
    print(f"device: {described}; {time.strftime('%Y-%m-%d')}; command: python {' '.join(sys.argv)}")
    print(markdown_table(rows, ctx["anchors"]))
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "device": described,
                    "torch": torch.__version__,
                    "triton": triton.__version__,
                    "date": time.strftime("%Y-%m-%d"),
                    "command": " ".join(sys.argv),
                    "anchors": ctx["anchors"],
                    "rows": [asdict(r) for r in rows],
                    "sweep": sweep_results,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()

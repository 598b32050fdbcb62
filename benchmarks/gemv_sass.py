"""Instructions and registers of the decode GEMV's K loop, compiled for Hopper without a GPU.

    TRITON_INTERPRET=0 python benchmarks/gemv_sass.py
    TRITON_INTERPRET=0 python benchmarks/gemv_sass.py --shapes gate_up --formats int8 --variants default,add
    TRITON_INTERPRET=0 python benchmarks/gemv_sass.py --formats int8-g128 --variants default --tile 16,512,4

Each case compiles one ``int8_linear`` (or ``gemv_16bit``) launch at a Llama-3-8B shape for
sm_90, with the default tile and K unsplit, as ``tests/cuda/compile_kernels.py`` does (its
compile-only driver, the ptxas Triton ships); it disassembles the cubin with Triton's
nvdisasm and counts the instructions of the K loop (the longest backward branch) by opcode;
cuobjdump gives the registers a thread holds. Divided by the weight elements a thread
handles each step, the count is the instructions per weight element: at batch-1 decode the
int8 GEMV issues them while memory delivers one byte per element, so few instructions a byte let it keep pace.

Variants undo one choice of the default configuration: ``cvt``/``add`` the int8 -> float32
conversion, ``acc-per-element`` the per-thread sums, ``prefetch`` turns the prefetch on.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the compile-only driver of tests/cuda
from neuron_llm.backends.cuda import int8_matmul  # noqa: E402
from tests.cuda.compile_kernels import H100_SMS, compiling_only  # noqa: E402

GROUP_SIZES = {"int8": None, "int8-g128": 128, "bf16": None}
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
VARIANTS = {
    "default": {},
    "cvt": {"convert": "cvt"},
    "add": {"convert": "add"},
    "acc-per-element": {"reduce_in_thread": False},
    "prefetch": {"prefetch": True},
}
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def compile_gemv(
    shape: str, fmt: str, variant: str, tile: dict[str, int] | None = None
) -> tuple[object, int8_matmul.Int8MatmulConfig]:
    """The compiled kernel of one decode GEMV launch and its configuration."""
    n, k = SHAPES[shape]
    swiglu = shape == "down"  # the down projection makes SwiGLU as it loads its input
    x = torch.randn(1, 2 * k if swiglu else k, dtype=torch.bfloat16)
    group_size = GROUP_SIZES[fmt]
    weight_bytes = 2 if fmt == "bf16" else 1
    config = int8_matmul.default_config(1, n, k, group_size, H100_SMS, weight_bytes=weight_bytes)
    # K unsplit: a split of two or three steps is unrolled whole, and has no loop to count.
    config = dataclasses.replace(config, split_k=1, **VARIANTS[variant], **(tile or {}))
    with compiling_only() as compiled:
        if fmt != "bf16":
            weight, scale = torch.zeros(n, k, dtype=torch.int8), torch.ones(n, k // (group_size or k))
            int8_matmul.int8_linear(x, weight, scale, None, group_size, config=config, silu_mul_input=swiglu)
        else:
            int8_matmul.gemv_16bit(x, torch.zeros(n, k, dtype=torch.bfloat16), config=config, silu_mul_input=swiglu)
    return compiled[-1], config


def loop_stats(cubin: bytes, workdir: Path) -> dict[str, object]:
    """Opcode counts of the longest backward branch's span, and the registers per thread."""
    path = workdir / "gemv.cubin"
    path.write_bytes(cubin)
    sass = subprocess.run([TOOLS / "nvdisasm", "-c", path], capture_output=True, text=True, check=True).stdout
    usage = subprocess.run([TOOLS / "cuobjdump", "-res-usage", path], capture_output=True, text=True, check=True)
    offsets = {m.group(1): int(m.group(2), 16) for m in re.finditer(r"^(\.L_x_\d+):\n\s*/\*([0-9a-f]+)\*/", sass, re.M)}
    instructions = [
        (int(m.group(1), 16), m.group(2))
        for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", sass)
    ]
    loop: list[str] = []
    for at, (offset, opcode) in enumerate(instructions):
        target = re.search(rf"/\*{offset:04x}\*/[^\n]*BRA `?\(?(\.L_x_\d+)", sass)
        if opcode == "BRA" and target and offsets.get(target.group(1), offset) < offset:
            body = [op for off, op in instructions[: at + 1] if off >= offsets[target.group(1)]]
            loop = max(loop, body, key=len)
    return {
        "registers": int(re.search(r"REG:(\d+)", usage.stdout).group(1)),
        "loop": len(loop),
        "opcodes": collections.Counter(loop).most_common(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--formats", default="int8,bf16", help=f"among {', '.join(GROUP_SIZES)}")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"among {', '.join(VARIANTS)}")
    parser.add_argument("--tile", help="N,K,WARPS: this tile instead of the default one")
    args = parser.parse_args()
    tile = None
    if args.tile:
        block_n, block_k, num_warps = (int(v) for v in args.tile.split(","))
        tile = {"block_n": block_n, "block_k": block_k, "num_warps": num_warps}
    if triton.knobs.runtime.interpret:
        parser.error("set TRITON_INTERPRET=0: the interpreter compiles nothing")
    workdir = Path(triton.knobs.cache.dir) / "gemv_sass"
    workdir.mkdir(parents=True, exist_ok=True)
    print("| shape | format | variant | tile (n x k) | registers | loop instructions | per weight | top opcodes |")
    print("|---|---|---|---|---:|---:|---:|---|")
    for shape in args.shapes.split(","):
        for fmt in args.formats.split(","):
            for variant in args.variants.split(","):
                if fmt == "bf16" and variant in ("cvt", "add"):
                    continue  # 16-bit weights take no conversion
                kernel, config = compile_gemv(shape, fmt, variant, tile)
                stats = loop_stats(kernel.asm["cubin"], workdir)
                per_thread = config.block_n * config.block_k / (32 * config.num_warps)
                top = ", ".join(f"{op} {count}" for op, count in stats["opcodes"][:6])
                print(
                    f"| {shape} | {fmt} | {variant} | {config.block_n} x {config.block_k} "
                    f"| {stats['registers']} | {stats['loop']} | {stats['loop'] / per_thread:.2f} | {top} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

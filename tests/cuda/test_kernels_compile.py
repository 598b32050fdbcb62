"""Every kernel of the cuda backend compiles for Hopper (sm_90), with or without a GPU.

Triton's interpreter never compiles a kernel, so one the compiler refuses (two return paths
of different types, say) passes every interpreted test. ``tests/cuda/compile_kernels.py``
compiles them all to cubins with the ptxas Triton ships; it runs in a subprocess because
this test session has switched the kernels to interpreter mode.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[2]
KERNELS = {
    "_argmax_kernel",
    "_decode_kernel",
    "_fill_placeholders_kernel",
    "_int8_matmul_kernel",
    "_prefill_kernel",
    "_quantize_rows_kernel",
    "_rms_norm_kernel",
    "_rms_norm_quantize_kernel",
    "_rotary_write_kv_kernel",
    "_silu_mul_kernel",
    "_top_k_top_p_kernel",
    "_top_p_kernel",
}


def _run_compiling(*args: str) -> str:
    """The stdout of ``python *args`` run in the repository, Triton compiling rather than interpreting."""
    result = subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env={**os.environ, "TRITON_INTERPRET": "0"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def test_every_kernel_compiles_for_hopper() -> None:
    stdout = _run_compiling("-m", "tests.cuda.compile_kernels")
    compiled = set(stdout.split("compiled:")[-1].split())
    assert compiled == KERNELS, compiled ^ KERNELS


def test_int8_gemv_loop_takes_fewer_instructions_and_registers_than_before() -> None:
    """The byte-permute conversion and the per-thread sums of the int8 GEMV (sm_90 SASS, as
    ``benchmarks/gemv_sass.py`` counts it): fewer instructions per weight than the integer
    add, fewer registers than an accumulator per weight element."""
    args = ["--shapes", "gate_up", "--formats", "int8", "--variants", "default,add,acc-per-element"]
    stdout = _run_compiling("benchmarks/gemv_sass.py", *args)
    rows = {}
    for line in stdout.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == 8 and cells[2] in ("default", "add", "acc-per-element"):
            rows[cells[2]] = {"registers": int(cells[4]), "per_weight": float(cells[6])}
    assert rows.keys() == {"default", "add", "acc-per-element"}, stdout
    assert rows["default"]["per_weight"] < 0.9 * rows["add"]["per_weight"], rows
    assert rows["default"]["registers"] < 0.75 * rows["acc-per-element"]["registers"], rows


_LAUNCHES_OF_STRIDED_WEIGHTS = """
import torch
from tests.cuda.compile_kernels import compiling_only
from neuron_llm.backends.cuda import fused, int8_matmul

x = torch.randn(1, 256, dtype=torch.bfloat16)
int8_weight, norm_weight = torch.zeros(256, 512, dtype=torch.int8), torch.randn(512, dtype=torch.bfloat16)
with compiling_only() as compiled:
    for weight, norm in ((int8_weight.t().contiguous(), norm_weight[:256]), (int8_weight.t(), norm_weight[::2])):
        int8_matmul.int8_linear(x, weight, torch.ones(512, 1))
        fused.rms_norm(x, norm, 1e-5)
print(" ".join(f"{kernel.name}:{kernel.metadata.launch_pdl}" for kernel in compiled))
"""


def test_a_weight_copied_for_a_kernel_is_read_in_stream_order() -> None:
    """The GEMV and the norm read their weight before the PDL wait (no kernel writes weights);
    a strided weight is copied first, by a kernel, so that launch must not start early."""
    launches = _run_compiling("-c", _LAUNCHES_OF_STRIDED_WEIGHTS).split()
    assert launches == [
        "_int8_matmul_kernel:True",
        "_rms_norm_kernel:True",
        "_int8_matmul_kernel:False",
        "_rms_norm_kernel:False",
    ]

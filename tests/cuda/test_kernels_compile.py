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
    "_decode_kernel",
    "_int8_matmul_kernel",
    "_prefill_kernel",
    "_quantize_rows_kernel",
    "_rms_norm_kernel",
    "_rms_norm_quantize_kernel",
    "_rotary_write_kv_kernel",
    "_silu_mul_kernel",
}


def test_every_kernel_compiles_for_hopper() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tests.cuda.compile_kernels"],
        cwd=REPO,
        env={**os.environ, "TRITON_INTERPRET": "0"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    compiled = set(result.stdout.split("compiled:")[-1].split())
    assert compiled == KERNELS, compiled ^ KERNELS

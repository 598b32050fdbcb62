"""Kernels compile for Hopper (sm_90) without a GPU: what Triton's interpreter cannot check.

The interpreter runs a kernel's Python, so a kernel that Triton's compiler refuses (e.g. two
return paths of different types) passes every interpreted test. Compiling to a cubin needs
no GPU, only the ptxas that Triton ships; it runs in a subprocess because the test session
has switched the kernels to interpreter mode.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

COMPILE_ROW_KERNEL = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from neuron_llm.backends.cuda import fp8

    pointers = {"x_ptr": "*bf16", "up_ptr": "*bf16", "scale_ptr": "*fp32"}
    scalars = {"num_features": "i32", "stride_x": "i64", "stride_up": "i64", "stride_q": "i64", "scale_ub": "fp32"}
    for out_type, is_int8 in (("*i8", True), ("*fp8e4nv", False)):
        for silu_mul in (False, True):
            for num_blocks in (1, 5):
                constants = {"HAS_UB": not is_int8, "IS_SILU_MUL": silu_mul, "IS_INT8": is_int8,
                             "BLOCK": 4096, "NUM_BLOCKS": num_blocks}
                signature = {**pointers, "q_ptr": out_type, **scalars, **{k: "constexpr" for k in constants}}
                source = ASTSource(fn=fp8._quantize_rows_kernel, signature=signature, constexprs=constants)
                triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": False})
    print("compiled")
    """
)


def test_row_quantization_kernel_compiles_for_hopper_in_every_mode() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run(
        [sys.executable, "-c", COMPILE_ROW_KERNEL], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    if "ptxas" in result.stderr and "not found" in result.stderr.lower():
        pytest.skip("Triton's ptxas is missing from this install")
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]

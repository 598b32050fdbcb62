"""The activation quantization's division by a row's inverse against correctly rounded division.

``fp8._divide`` with BY_INVERSE replaces ``values / scale`` by a product with the row's
inverse and one Markstein correction. Its result depends only on the significands of value
and scale while nothing leaves the normal range, so the first test covers every case there:
every fp16 significand (bf16's are among them) against every float32 one. The others check
the exponents at the edges of that range and the rows the kernels keep on the division.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import triton
import triton.language as tl

from neuron_llm.backends.cuda import fp8
from neuron_llm.backends.cuda.fp8 import quantize_fp8_per_token, quantize_int8_per_token, rms_norm_quantize_fp8
from neuron_llm.quant.formats import (
    FP8_DTYPE,
    FP8_MIN_ACTIVATION_SCALE,
    quantize_fp8_activation,
    quantize_int8_activation,
)

pytestmark = pytest.mark.cuda

_BLOCK = 1024


@triton.jit
def _count_mismatches_kernel(values_ptr, num_values, mismatches_ptr, BLOCK: tl.constexpr):
    """For every value, against the BLOCK float32 divisors in [1, 2) of this program."""
    divisor_bits = 0x3F800000 + tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    scale = divisor_bits.to(tl.float32, bitcast=True)
    inverse = tl.math.div_rn(1.0, scale)
    wrong = tl.zeros((BLOCK,), dtype=tl.int32)
    for i in range(num_values):
        value = tl.load(values_ptr + i)
        by_inverse = fp8._divide(value, scale, inverse, True)
        exact = tl.math.div_rn(value, scale)
        wrong += (by_inverse.to(tl.int32, bitcast=True) != exact.to(tl.int32, bitcast=True)).to(tl.int32)
    tl.atomic_add(mismatches_ptr, tl.sum(wrong, axis=0))


@triton.jit
def _quantize_pairs_kernel(values_ptr, scales_ptr, quotient_ptr, fp8_ptr, int8_ptr, n, BY_INVERSE: tl.constexpr):
    offs = tl.program_id(0) * 1024 + tl.arange(0, 1024)
    mask = offs < n
    values = tl.load(values_ptr + offs, mask=mask, other=1.0)
    scale = tl.load(scales_ptr + offs, mask=mask, other=1.0)
    inverse = tl.math.div_rn(1.0, scale)
    quotient = fp8._divide(values, scale, inverse, BY_INVERSE)
    tl.store(quotient_ptr + offs, quotient, mask=mask)
    tl.store(fp8_ptr + offs, fp8._codes(quotient, False), mask=mask)
    tl.store(int8_ptr + offs, fp8._codes(quotient, True), mask=mask)


def _quantize_pairs(values: torch.Tensor, scales: torch.Tensor, by_inverse: bool) -> list[torch.Tensor]:
    outputs = [
        torch.empty_like(values),
        torch.empty_like(values, dtype=FP8_DTYPE),
        torch.empty_like(values, dtype=torch.int8),
    ]
    n = values.numel()
    _quantize_pairs_kernel[(triton.cdiv(n, 1024),)](values, scales, *outputs, n, by_inverse, enable_fp_fusion=False)
    return [outputs[0].view(torch.int32), outputs[1].view(torch.uint8), outputs[2]]


def test_every_16_bit_significand_against_every_float32_one() -> None:
    significands = torch.arange(0x3C00, 0x4000, dtype=torch.int16).view(torch.float16).float()  # [1, 2)
    values = torch.cat([significands, -significands, torch.tensor([0.0, -0.0])]).cuda()
    mismatches = torch.zeros(1, dtype=torch.int32, device="cuda")
    _count_mismatches_kernel[(2**23 // _BLOCK,)](values, values.numel(), mismatches, _BLOCK, enable_fp_fusion=False)
    assert mismatches.item() == 0


def test_quantized_codes_across_exponents() -> None:
    """Every finite bf16 value against divisors over the range a row may divide by its inverse:
    the same quotient where the remainder is a normal number, the same fp8 and int8 codes everywhere."""
    generator = torch.Generator().manual_seed(0)
    bf16 = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    bf16 = bf16[bf16.isfinite()]
    scales = 2.0 ** torch.empty(256).uniform_(-100, 99, generator=generator)
    scales = torch.cat([scales, torch.tensor([FP8_MIN_ACTIVATION_SCALE, 1.0, 2.0**-100])])
    values, scales = (t.reshape(-1).cuda() for t in torch.broadcast_tensors(bf16[:, None], scales[None, :]))
    inside = (values.abs() * (1 / scales) < 2.0**100) & (scales >= 2.0**-100)  # the rows' own condition
    values, scales = values[inside].contiguous(), scales[inside].contiguous()
    by_inverse, exact = _quantize_pairs(values, scales, True), _quantize_pairs(values, scales, False)
    normal_remainder = values.abs() >= 2.0**-102
    assert torch.equal(by_inverse[0][normal_remainder], exact[0][normal_remainder])
    assert torch.equal(by_inverse[1], exact[1]) and torch.equal(by_inverse[2], exact[2])
    assert torch.equal(exact[1], (values / scales).clamp(-448, 448).to(FP8_DTYPE).view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rows_outside_the_inverse_range_keep_the_division(dtype: torch.dtype) -> None:
    """Infinite values, a bound that lets quotients overflow, signed zeros, and an int8 row
    whose scale is below 2^-100: the reference's bits in every row."""
    assert fp8._divides_by_inverse_for(dtype)  # the other rows take the inverse
    big = torch.finfo(dtype).max
    x = torch.randn(6, 300) * 4
    x[0, :3] = torch.tensor([float("inf"), -float("inf"), 1.0])
    x[1, :2] = torch.tensor([big, -big])
    x[2] = -0.0
    x[3, ::2] = -0.0
    x[4] = x[4] * 1e-7
    x[5] = torch.tensor([-1e-30, 1e-30, 0.0] * 100)
    x = x.to(dtype).cuda()
    for scale_ub in (1200.0, 1.0, None):
        rows = x if scale_ub is not None else x[1:]  # unbounded, an infinite value makes NaNs
        q, scale = quantize_fp8_per_token(rows, scale_ub)
        expected_q, expected_scale = quantize_fp8_activation(rows, scale_ub)
        assert torch.equal(q.view(torch.uint8), expected_q.view(torch.uint8)) and torch.equal(scale, expected_scale)
    assert (q[1].view(torch.uint8) == 0x80).all()  # -0 stays -0
    q, scale = quantize_int8_per_token(x[1:])
    expected_q, expected_scale = quantize_int8_activation(x[1:])
    assert torch.equal(q, expected_q) and torch.equal(scale, expected_scale)
    assert scale[-1].item() < 2.0**-100  # the last row divides: no inverse for a scale that small
    weight = torch.ones(300, dtype=dtype, device="cuda")
    q, scale, _ = rms_norm_quantize_fp8(x[2:4], None, weight, 1e-5, 1200.0)
    assert (q[0].view(torch.uint8) == 0x80).all()

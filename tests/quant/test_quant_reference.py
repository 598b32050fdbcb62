"""The tile-by-tile reference matmuls against dequantize-then-matmul, and fp8 against torch._scaled_mm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from neuron_llm.quant import reference
from neuron_llm.quant.formats import (
    dequantize_fp8,
    dequantize_int8,
    quantize_fp8_activation,
    quantize_fp8_weight,
    quantize_int8,
    quantize_int8_activation,
)

OUT_FEATURES, IN_FEATURES = 96, 200
# One-row tiles, a tile size that leaves a short last tile, and the whole weight at once.
TILE_ELEMENTS = [IN_FEATURES, 7 * IN_FEATURES, OUT_FEATURES * IN_FEATURES]


def operands(dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, IN_FEATURES, generator=generator).to(dtype)  # leading dims are kept
    weight = torch.randn(OUT_FEATURES, IN_FEATURES, generator=generator) * 0.05
    bias = torch.randn(OUT_FEATURES, generator=generator).to(dtype)
    return x, weight, bias


@pytest.mark.parametrize("tile_elements", TILE_ELEMENTS)
@pytest.mark.parametrize("group_size", [None, 64])
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_int8_tiles_equal_dequantize_then_matmul(
    tile_elements: int, group_size: int | None, dtype: torch.dtype, tolerance: float
) -> None:
    x, weight, bias = operands(dtype)
    q, scale = quantize_int8(weight, group_size)
    out = reference.int8_linear(x, q, scale, bias, group_size, tile_elements=tile_elements)
    # In float64, whatever the dtype under test: the tolerance allows for its rounding alone.
    exact = dequantize_int8(q, scale, torch.float64, group_size)
    expected = F.linear(x.double(), exact, bias.double()).to(dtype)
    assert out.shape == (3, 5, OUT_FEATURES) and out.dtype == dtype
    torch.testing.assert_close(out, expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())


@pytest.mark.parametrize("tile_elements", TILE_ELEMENTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_tiles_equal_dequantize_then_matmul(tile_elements: int, dtype: torch.dtype) -> None:
    x, weight, bias = operands(dtype)
    x[0, 0, 0] = 5000.0  # one token beyond the activation bound
    q, scale = quantize_fp8_weight(weight)
    out = reference.fp8_linear(x, q, scale, bias, activation_scale_ub=1200.0, tile_elements=tile_elements)
    x_q, x_scale = quantize_fp8_activation(x.reshape(-1, IN_FEATURES), 1200.0)
    expected = F.linear(dequantize_fp8(x_q, x_scale, torch.float32), dequantize_fp8(q, scale, torch.float32))
    expected = (expected.to(dtype) + bias).reshape(3, 5, OUT_FEATURES)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out, expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())


@pytest.mark.parametrize("tile_elements", TILE_ELEMENTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a8_tiles_equal_the_integer_matmul(tile_elements: int, dtype: torch.dtype) -> None:
    """The reference computes what an int8 GEMM (exact int32 sums, then both scales) computes."""
    x, weight, bias = operands(dtype)
    x[1, 2, 3] = 300.0  # an outlier token
    q, scale = quantize_int8(weight)
    out = reference.w8a8_linear(x, q, scale, bias, tile_elements=tile_elements)
    x_q, x_scale = quantize_int8_activation(x.reshape(-1, IN_FEATURES))
    sums = torch._int_mm(x_q, q.t().contiguous()).double()  # exact: [15, 200] @ [200, 96]
    expected = (sums * x_scale.double() * scale.t().double()).to(dtype) + bias
    expected = expected.reshape(3, 5, OUT_FEATURES)
    assert out.shape == expected.shape and out.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out, expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())


def _has_cpu_scaled_mm() -> bool:
    # Row-wise scales, as the test uses: torch 2.8's CPU kernel takes per-tensor scales only.
    a = torch.zeros(16, 16, dtype=torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.float32)
    except (RuntimeError, NotImplementedError):
        return False
    return True


@pytest.mark.skipif(not _has_cpu_scaled_mm(), reason="this torch has no CPU torch._scaled_mm")
def test_fp8_reference_matches_scaled_mm() -> None:
    """The reference computes what the real fp8 path (row-wise scaled fp8 GEMM) computes."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(32, 128, generator=generator)
    weight = torch.randn(64, 128, generator=generator) * 0.05
    q, scale = quantize_fp8_weight(weight)
    x_q, x_scale = quantize_fp8_activation(x, 1200.0)
    expected = torch._scaled_mm(x_q, q.t(), scale_a=x_scale, scale_b=scale.t(), out_dtype=torch.float32)
    out = reference.fp8_linear(x, q, scale, activation_scale_ub=1200.0, tile_elements=16 * 128)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_tile_rows_bound_the_dequantized_tile() -> None:
    assert reference.tile_rows(1536, 576) == (1 << 18) // 576
    assert reference.tile_rows(10, 576) == 10
    assert reference.tile_rows(4, 1 << 20) == 1  # a row wider than the budget is one tile

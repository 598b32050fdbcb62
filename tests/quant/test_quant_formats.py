"""Quantize/dequantize error bounds per format, zero rows and columns, the activation bound, NaN/inf."""

from __future__ import annotations

import pytest
import torch

from neuron_llm.layers.linear import Linear
from neuron_llm.quant.formats import (
    FP8_DTYPE,
    FP8_MAX,
    LinearFormat,
    dequantize_fp8,
    dequantize_int8,
    quantize_fp8_activation,
    quantize_fp8_weight,
    quantize_int8,
    quantize_int8_activation,
)
from neuron_llm.quant.layers import quantize_linear

# e4m3 keeps 3 mantissa bits: rounding to nearest is off by at most 2^-4 of the value for
# normal numbers, and by half the subnormal step 2^-9, i.e. 2^-10, below 2^-6.
FP8_RELATIVE_BOUND = 2.0**-4
FP8_SUBNORMAL_BOUND = 2.0**-10
EPS = 1e-6  # float32 slack in the bounds


def random_weight(out_features: int = 64, in_features: int = 300, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    # Rows of very different magnitudes, so a shared scale would fail the per-row bounds.
    row_scale = torch.logspace(-3, 1, out_features).unsqueeze(1)
    return torch.randn(out_features, in_features, generator=generator) * row_scale


@pytest.mark.parametrize("group_size", [None, 128, 64])
def test_int8_error_is_at_most_half_a_scale(group_size: int | None) -> None:
    weight = random_weight()
    q, scale = quantize_int8(weight, group_size)
    groups = 1 if group_size is None else -(-300 // group_size)  # 300 is not a multiple: a short last group
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert scale.shape == (64, groups)
    assert int(q.abs().max()) <= 127
    per_element_scale = scale.repeat_interleave(group_size or 300, dim=1)[:, :300]
    error = (dequantize_int8(q, scale, torch.float32, group_size) - weight).abs()
    assert bool((error <= per_element_scale * (0.5 + EPS)).all())
    # Each row's (group's) largest magnitude sets its scale, so it is represented exactly.
    assert torch.allclose((q.float() * per_element_scale).abs().amax(dim=1), weight.abs().amax(dim=1))


def test_fp8_weight_error_bound() -> None:
    weight = random_weight()
    q, scale = quantize_fp8_weight(weight)
    assert q.dtype == FP8_DTYPE and scale.shape == (64, 1)
    assert torch.equal(scale, weight.abs().amax(dim=1, keepdim=True) / FP8_MAX)
    error = (dequantize_fp8(q, scale, torch.float32) - weight).abs()
    bound = torch.maximum(weight.abs() * FP8_RELATIVE_BOUND, scale * FP8_SUBNORMAL_BOUND)
    assert bool((error <= bound * (1 + EPS)).all())


def test_fp8_activations_within_the_bound_are_quantized_per_token() -> None:
    x = random_weight(8, 512, seed=1)  # row maxima from ~0.003 to ~40, all below 1200
    q, scale = quantize_fp8_activation(x, scale_ub=1200.0)
    assert scale.shape == (8, 1)
    assert torch.allclose(scale, x.abs().amax(dim=1, keepdim=True) / FP8_MAX)
    error = (q.float() * scale - x).abs()
    assert bool((error <= torch.maximum(x.abs() * FP8_RELATIVE_BOUND, scale * FP8_SUBNORMAL_BOUND) * (1 + EPS)).all())


def test_activation_row_beyond_the_bound_saturates() -> None:
    x = torch.tensor([[5000.0, -3000.0, 600.0, 1.0], [3.0, -2.0, 1.0, 0.5]])
    q, scale = quantize_fp8_activation(x, scale_ub=1200.0)
    # Row 0's absolute maximum 5000 is bounded to 1200: its scale is 1200 / 448 and values
    # beyond +-1200 saturate there; values inside keep fp8 precision at that scale.
    assert scale[0, 0] == pytest.approx(1200.0 / FP8_MAX)
    dequantized = q.float() * scale
    assert dequantized[0, 0] == pytest.approx(1200.0) and dequantized[0, 1] == pytest.approx(-1200.0)
    assert dequantized[0, 2] == pytest.approx(600.0, rel=FP8_RELATIVE_BOUND)
    # Row 1 is unaffected by the bound.
    assert scale[1, 0] == pytest.approx(3.0 / FP8_MAX)
    # Unbounded, row 0 keeps its own scale and its largest value.
    q, scale = quantize_fp8_activation(x, scale_ub=None)
    assert (q.float() * scale)[0, 0] == pytest.approx(5000.0)


def test_int8_activations_are_quantized_per_token_within_half_a_step() -> None:
    x = random_weight(8, 512, seed=2)  # row maxima from ~0.003 to ~40
    x[3, 100] = 5000.0  # an outlier widens its own token's step only
    q, scale = quantize_int8_activation(x)
    assert q.dtype == torch.int8 and scale.shape == (8, 1) and int(q.abs().max()) <= 127
    assert torch.allclose(scale, x.abs().amax(dim=1, keepdim=True) / 127)
    error = (q.float() * scale - x).abs()
    assert bool((error <= scale * (0.5 + EPS)).all())
    assert (q.float() * scale)[3, 100] == pytest.approx(5000.0)


def test_all_zero_rows_and_columns_quantize_to_zeros_with_positive_scales() -> None:
    weight = random_weight(6, 256)
    weight[2] = 0  # a zero row
    weight[:, 7] = 0  # a zero column
    weight[4, 128:] = 0  # a zero group
    for q, scale in (
        quantize_int8(weight),
        quantize_int8(weight, 128),
        quantize_fp8_weight(weight),
        quantize_fp8_activation(weight),
        quantize_int8_activation(weight),
    ):
        assert bool(torch.isfinite(scale).all()) and bool((scale > 0).all())
        dequantized = q.float() * scale.repeat_interleave(256 // scale.shape[1], dim=1)
        assert bool(torch.isfinite(dequantized).all())
        assert bool((dequantized[2] == 0).all()) and bool((dequantized[:, 7] == 0).all())
        assert bool((dequantized[4, 128:] == 0).all())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("scheme", ["int8", "fp8", "w8a8"])
def test_non_finite_weights_are_refused(bad: float, scheme: str) -> None:
    linear = Linear(16, 8)
    linear.weight.data.normal_()
    linear.weight.data[3, 5] = bad
    with pytest.raises(
        ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.weight holds 1 NaN/inf value\(s\); refusing to quantize"
    ):
        quantize_linear(linear, LinearFormat(scheme), "model.layers.0.mlp.up_proj")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scheme": "int4"}, "scheme='int4'"),
        ({"scheme": "fp8", "group_size": 128}, "only the int8 scheme"),
        ({"scheme": "int8", "group_size": 0}, "group_size=0"),
        ({"scheme": "int8", "activation_scale_ub": 1200.0}, "only fp8 bounds its activations"),
        ({"scheme": "fp8", "activation_scale_ub": -1.0}, "activation_scale_ub=-1.0"),
    ],
)
def test_bad_formats_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LinearFormat(**kwargs)

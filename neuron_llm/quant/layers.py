"""Quantized linear layers: drop-in replacements for ``neuron_llm.layers.linear.Linear``.

Parameters keep the checkpoint layout of compressed-tensors: ``weight`` [out, in] in int8 or
float8_e4m3fn and ``weight_scale`` float32 [out, 1] (per channel) or [out, groups]. Rows are
output channels, so a column-parallel shard is a block of rows of both, and a row-parallel
shard a block of columns of ``weight`` (and of group scales, at group boundaries).

A quantized parameter's ``weight_loader`` refuses a checkpoint tensor of another dtype rather
than casting it: a float weight copied into int8 would be silently wrong.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from neuron_llm import ops
from neuron_llm.layers.linear import Linear
from neuron_llm.quant.formats import (
    FP8_DTYPE,
    LinearFormat,
    count_non_finite,
    num_groups,
    quantize_fp8_weight,
    quantize_int8,
)

if TYPE_CHECKING:
    # The loader package imports transformers; the layers only need the protocol's name.
    from neuron_llm.loader.weights import TensorSource


def _read_same_shape(
    param: nn.Parameter, source: TensorSource, index: object, full_shape: tuple[int, ...] | None
) -> torch.Tensor:
    """``source[index]``, checked: the whole tensor is ``full_shape`` (if given), the slice is ``param``'s shape."""
    if full_shape is not None and tuple(source.shape) != full_shape:
        raise ValueError(f"checkpoint shape {tuple(source.shape)} does not match the unsharded shape {full_shape}")
    tensor = source[index]
    if tuple(tensor.shape) != tuple(param.shape):
        raise ValueError(f"checkpoint shape {tuple(tensor.shape)} does not match parameter shape {tuple(param.shape)}")
    return tensor


def load_exact(
    param: nn.Parameter, source: TensorSource, index: object = ..., full_shape: tuple[int, ...] | None = None
) -> None:
    """Copy ``source[index]`` into a quantized weight, refusing a shape or dtype mismatch and NaN values.

    ``index`` and ``full_shape`` select a tensor-parallel shard (see ``neuron_llm.parallel.quantized``).
    """
    tensor = _read_same_shape(param, source, index, full_shape)
    if tensor.dtype != param.dtype:
        raise ValueError(f"checkpoint dtype {tensor.dtype} does not match the quantized weight's {param.dtype}")
    if tensor.is_floating_point() and (bad := count_non_finite(tensor)):
        raise ValueError(f"the checkpoint's quantized weight holds {bad} NaN value(s): the checkpoint is broken")
    param.data.copy_(tensor)


def load_scale(
    param: nn.Parameter, source: TensorSource, index: object = ..., full_shape: tuple[int, ...] | None = None
) -> None:
    """Copy scales ``source[index]`` (any float dtype, cast to float32), refusing non-finite or non-positive ones."""
    tensor = _read_same_shape(param, source, index, full_shape).float()
    if not bool((tensor > 0).all()) or count_non_finite(tensor):
        raise ValueError("the checkpoint's scales hold zero, negative, NaN or inf values: the checkpoint is broken")
    param.data.copy_(tensor)


class QuantizedLinear(nn.Module):
    """What the quantized linears share: an 8-bit weight, its scales, an optional bias, their format."""

    def __init__(self, in_features: int, out_features: int, bias: bool, fmt: LinearFormat) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.format = fmt
        weight_dtype = FP8_DTYPE if fmt.scheme == "fp8" else torch.int8
        scale_columns = num_groups(in_features, fmt.group_size)
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=weight_dtype), requires_grad=False)
        self.weight_scale = nn.Parameter(
            torch.ones(out_features, scale_columns, dtype=torch.float32), requires_grad=False
        )
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.weight.weight_loader = load_exact
        self.weight_scale.weight_loader = load_scale

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, {self.format}, "
            f"bias={self.bias is not None}"
        )


class Int8Linear(QuantizedLinear):
    """int8 weight-only linear (W8A16): activations stay 16/32-bit, weights are int8.

    ``group_size`` None keeps one scale per output channel; otherwise one per group of
    ``group_size`` input features (the last group of a row may be shorter).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int | None = None) -> None:
        super().__init__(in_features, out_features, bias, LinearFormat("int8", group_size=group_size))

    @property
    def group_size(self) -> int | None:
        return self.format.group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.int8_linear(x, self.weight, self.weight_scale, self.bias, self.group_size)


class Fp8Linear(QuantizedLinear):
    """fp8 e4m3 linear (W8A8): per-channel weight scales, dynamic per-token activation scales.

    ``activation_scale_ub`` bounds each token's activation absolute maximum (None: unbounded).
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool = False, activation_scale_ub: float | None = None
    ) -> None:
        super().__init__(in_features, out_features, bias, LinearFormat("fp8", activation_scale_ub=activation_scale_ub))

    @property
    def activation_scale_ub(self) -> float | None:
        return self.format.activation_scale_ub

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.fp8_linear(x, self.weight, self.weight_scale, self.bias, self.activation_scale_ub)


class W8A8Linear(QuantizedLinear):
    """int8 linear (W8A8): per-channel int8 weights, activations quantized to int8 per token."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(in_features, out_features, bias, LinearFormat("w8a8"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.w8a8_linear(x, self.weight, self.weight_scale, self.bias)


def quantized_linears(model: nn.Module) -> dict[str, LinearFormat]:
    """The quantized linears of ``model``: name -> format, in module order."""
    return {name: m.format for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def empty_quantized_linear(fmt: LinearFormat, in_features: int, out_features: int, bias: bool) -> QuantizedLinear:
    """A quantized linear of format ``fmt`` whose weights a checkpoint will fill."""
    if fmt.scheme == "int8":
        return Int8Linear(in_features, out_features, bias, fmt.group_size)
    if fmt.scheme == "w8a8":
        return W8A8Linear(in_features, out_features, bias)
    return Fp8Linear(in_features, out_features, bias, fmt.activation_scale_ub)


def quantize_linear(linear: Linear, fmt: LinearFormat, name: str) -> QuantizedLinear:
    """The quantized form of the loaded ``linear``, on its device; ``name`` is used in errors.

    Raises ``ValueError`` naming the module when its weight holds NaN or inf.
    """
    weight = linear.weight.detach()
    refuse_non_finite(weight, name)
    with torch.device(weight.device):
        layer = empty_quantized_linear(fmt, linear.in_features, linear.out_features, bias=False)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    if fmt.scheme == "fp8":
        q, scale = quantize_fp8_weight(weight)
    else:
        q, scale = quantize_int8(weight, fmt.group_size)
    layer.weight.data.copy_(q)
    layer.weight_scale.data.copy_(scale)
    return layer


def refuse_non_finite(weight: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` naming linear ``name`` when its weight holds NaN or inf.

    One such value would make its row's scale, and so the whole row, garbage.
    """
    if bad := count_non_finite(weight):
        raise ValueError(
            f"{name}.weight holds {bad} NaN/inf value(s); refusing to quantize it "
            "(the checkpoint is broken: check where it came from)"
        )

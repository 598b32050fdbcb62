"""Tensor-parallel quantized linears: the 8-bit layers of ``neuron_llm.quant`` split as Megatron splits them.

A column-parallel shard holds a block of output rows of the weight and of its scales (per
channel or per group: scales follow their rows), and runs as the plain quantized layer. A
row-parallel shard holds a block of input columns of the weight, every row's per-channel
scale, or the block of group scales its columns cover (so a group must not straddle two
ranks), and all-reduces its partial products like ``RowParallelLinear``.

Activations are quantized where they are: a row-parallel fp8 or w8a8 shard scales each token
by the maximum over its own input block, a finer quantization than one device's (as vLLM's
shards do). Quantized on load, a row-parallel shard's per-channel weight scales likewise come
from its own columns; read from a checkpoint, every shard has the checkpoint's scales.
"""

from __future__ import annotations

import functools

import torch

from neuron_llm.layers.linear import Linear
from neuron_llm.parallel.layers import Partition, RowParallelLinear
from neuron_llm.parallel.state import all_reduce
from neuron_llm.quant.formats import LinearFormat, num_groups
from neuron_llm.quant.layers import (
    Fp8Linear,
    Int8Linear,
    QuantizedLinear,
    W8A8Linear,
    empty_quantized_linear,
    load_exact,
    load_scale,
    quantize_linear,
)


class _RowParallel:
    """Sums the partial products of the ranks' input blocks (mixed into a quantized linear)."""

    partition: Partition

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(super().forward(x), self.partition.count)  # type: ignore[misc]


class Int8RowParallelLinear(_RowParallel, Int8Linear):
    pass


class Fp8RowParallelLinear(_RowParallel, Fp8Linear):
    pass


class W8A8RowParallelLinear(_RowParallel, W8A8Linear):
    pass


def column_parallel(fmt: LinearFormat, in_features: int, out_features: int, partition: Partition) -> QuantizedLinear:
    """An empty column-parallel shard of a quantized [out_features, in_features] linear."""
    start, end = partition.bounds(out_features)
    layer = empty_quantized_linear(fmt, in_features, end - start, bias=False)
    scale_shape = (out_features, num_groups(in_features, fmt.group_size))
    layer.weight.weight_loader = functools.partial(
        load_exact, index=slice(start, end), full_shape=(out_features, in_features)
    )
    layer.weight_scale.weight_loader = functools.partial(load_scale, index=slice(start, end), full_shape=scale_shape)
    return layer


def row_parallel(fmt: LinearFormat, in_features: int, out_features: int, partition: Partition) -> QuantizedLinear:
    """An empty row-parallel shard of a quantized [out_features, in_features] linear.

    Raises ``ValueError`` when per-group scales would straddle two ranks.
    """
    start, end = partition.bounds(in_features)
    layer = _empty_row_parallel(fmt, end - start, out_features, partition)
    layer.weight.weight_loader = functools.partial(
        load_exact, index=(slice(None), slice(start, end)), full_shape=(out_features, in_features)
    )
    group_size = fmt.group_size
    scale_shape = (out_features, num_groups(in_features, group_size))
    scales = slice(None) if group_size is None else (slice(None), slice(start // group_size, end // group_size))
    layer.weight_scale.weight_loader = functools.partial(load_scale, index=scales, full_shape=scale_shape)
    return layer


def quantize_parallel_linear(linear: Linear, fmt: LinearFormat, name: str) -> QuantizedLinear:
    """The quantized form of a loaded shard (column- or row-parallel), quantized from the shard alone.

    Raises ``ValueError`` for a row-parallel shard whose groups would straddle two ranks, as
    ``row_parallel`` does: groups of one device's quantization, and an artifact's shards that load.
    """
    quantized = quantize_linear(linear, fmt, name)
    if not isinstance(linear, RowParallelLinear):
        return quantized
    with torch.device(linear.weight.device):
        layer = _empty_row_parallel(fmt, linear.in_features, linear.out_features, linear.partition)
    layer.load_state_dict(quantized.state_dict())
    return layer


def _empty_row_parallel(
    fmt: LinearFormat, in_features: int, out_features: int, partition: Partition
) -> QuantizedLinear:
    """A row-parallel shard of ``in_features`` input features; ``ValueError`` when they do not
    hold whole groups of scales (a group would straddle two ranks: every shard starts at a
    multiple of ``in_features``)."""
    if fmt.group_size is not None and in_features % fmt.group_size:
        raise ValueError(
            f"group_size={fmt.group_size} does not divide each rank's {in_features} input features: "
            "a group of scales would straddle two ranks"
        )
    if fmt.scheme == "int8":
        layer: QuantizedLinear = Int8RowParallelLinear(in_features, out_features, group_size=fmt.group_size)
    elif fmt.scheme == "fp8":
        layer = Fp8RowParallelLinear(in_features, out_features, activation_scale_ub=fmt.activation_scale_ub)
    else:
        layer = W8A8RowParallelLinear(in_features, out_features)
    layer.partition = partition
    return layer

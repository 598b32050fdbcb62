"""Reference matmuls of the quantized weight formats, in plain PyTorch (CPU, CUDA, XLA).

These are the ground truth the backends' kernels are tested against. The weight is walked in
tiles of output rows: each tile is dequantized to the compute dtype, multiplied, and dropped
before the next, so a 16-bit copy of the whole weight never exists (only one tile's worth),
as in a kernel that streams int8/fp8 bytes and dequantizes them on chip. Tiling by output
rows keeps every output element's dot product inside one matmul (no partial sums to add up)
and keeps each row's scales, per channel or per group, inside its tile.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from neuron_llm.quant.formats import (
    DEFAULT_ACTIVATION_SCALE_UB,
    dequantize_int8,
    quantize_fp8_activation,
    quantize_int8_activation,
)

TILE_ELEMENTS = 1 << 18
"""Weight elements dequantized at a time: 256 Ki (512 KiB in bf16), about one core's L2."""


def tile_rows(out_features: int, in_features: int, tile_elements: int = TILE_ELEMENTS) -> int:
    """Output rows per tile so that a tile holds about ``tile_elements`` weight elements."""
    return max(1, min(out_features, tile_elements // in_features))


def int8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    group_size: int | None = None,
    tile_elements: int = TILE_ELEMENTS,
) -> torch.Tensor:
    """``x @ dequantize(weight).T + bias`` for an int8 weight-only (W8A16) linear.

    ``x`` is [..., in]; ``weight`` int8 [out, in]; ``weight_scale`` float32 [out, 1] (per
    channel, ``group_size`` None) or [out, ceil(in / group_size)]. Each tile of rows is
    dequantized to ``x.dtype``, the dtype the matmul runs in. Returns [..., out] in ``x.dtype``.
    """
    out_features, in_features = weight.shape
    x2 = x.reshape(-1, in_features)  # [tokens, in]
    step = tile_rows(out_features, in_features, tile_elements)
    tiles = []
    for start in range(0, out_features, step):
        rows = slice(start, start + step)
        w_tile = dequantize_int8(weight[rows], weight_scale[rows], x.dtype, group_size)
        tiles.append(F.linear(x2, w_tile))  # [tokens, rows of this tile]
    out = torch.cat(tiles, dim=1)
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], out_features)


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation_scale_ub: float | None = DEFAULT_ACTIVATION_SCALE_UB,
    tile_elements: int = TILE_ELEMENTS,
) -> torch.Tensor:
    """``x @ weight.T`` the way an fp8 (W8A8) matmul computes it: both operands in fp8.

    ``x`` [..., in] is quantized per token (``quantize_fp8_activation``); ``weight`` is
    float8_e4m3fn [out, in] with float32 ``weight_scale`` [out, 1]. The fp8 products are
    summed in float32 and scaled by ``x_scale * weight_scale`` afterwards, as
    ``torch._scaled_mm`` and fp8 tensor cores do; fp8 values are exact in float32, so the
    only differences from the hardware path are the summation order. Returns [..., out] in
    ``x.dtype``.
    """
    x_q, x_scale = quantize_fp8_activation(x.reshape(-1, weight.shape[1]), activation_scale_ub)
    return _scaled_linear(x, x_q, x_scale, weight, weight_scale, bias, tile_elements)


def w8a8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    tile_elements: int = TILE_ELEMENTS,
) -> torch.Tensor:
    """``x @ weight.T`` the way an int8 (W8A8) matmul computes it: both operands in int8.

    ``x`` [..., in] is quantized per token (``quantize_int8_activation``); ``weight`` is int8
    [out, in] with float32 ``weight_scale`` [out, 1]. The products are exact in float32; their
    sum is rounded to float32 where int8 tensor cores add exactly in int32, a difference far
    below the quantization error. Returns [..., out] in ``x.dtype``.
    """
    x_q, x_scale = quantize_int8_activation(x.reshape(-1, weight.shape[1]))
    return _scaled_linear(x, x_q, x_scale, weight, weight_scale, bias, tile_elements)


def _scaled_linear(
    x: torch.Tensor,
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    tile_elements: int,
) -> torch.Tensor:
    """``(x_q @ weight.T) * x_scale * weight_scale.T + bias`` in float32, tile by tile, shaped like ``x``.

    One tile is one matmul, without slices or a concatenation: XLA's partitioner gathers a
    tensor-parallel linear's output across a concatenation (the neuron backend asks for one).
    """
    out_features, in_features = weight.shape
    x_f = x_q.float()  # [tokens, in], exact
    step = tile_rows(out_features, in_features, tile_elements)
    if step == out_features:
        out = F.linear(x_f, weight.float()) * weight_scale.T
    else:
        tiles = []
        for start in range(0, out_features, step):
            w_tile = weight[start : start + step].float()  # [rows, in], exact
            tiles.append(F.linear(x_f, w_tile) * weight_scale[start : start + step].T)
        out = torch.cat(tiles, dim=1)
    out = (out * x_scale).to(x.dtype)  # [tokens, out]
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], out_features)

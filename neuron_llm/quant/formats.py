"""The arithmetic of the 8-bit weight formats: quantize, dequantize, and their scales.

All three are symmetric (no zero point): a real value is ``q * scale``.

- ``int8`` (weight-only, W8A16): ``q`` in [-127, 127], one scale per output channel (weight
  row) or per group of ``group_size`` consecutive input features of a row. The scale is the
  row's (group's) absolute maximum over 127, so the largest weight is represented exactly
  and every weight is off by at most half a scale.
- ``fp8`` (W8A8, e4m3): ``q`` is a float8 e4m3fn number in [-448, 448], one scale per output
  channel; activations are quantized at run time with one scale per token (row), whose
  absolute maximum is first bounded above (Llama 3 used 1200, Dubey et al. 2024, sec. 6.2),
  so that a rare huge activation saturates instead of crushing the rest of its row to zero.
- ``w8a8`` (int8 weights and activations): int8 weights as ``int8`` per channel; activations
  quantized at run time to int8 with one scale per token, unbounded. Outlier activation
  channels cost int8 far more than fp8, which is what SmoothQuant's smoothing (see
  ``neuron_llm.quant.smoothquant``) moves into the weights beforehand.

Scales are float32: they are a small share of the bytes, and keeping them exact makes a
save/load round trip bit-exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

INT8_MAX = 127
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
DEFAULT_ACTIVATION_SCALE_UB = 1200.0
"""Upper bound on a token's activation absolute maximum before fp8 quantization (Llama 3)."""
FP8_MIN_ACTIVATION_SCALE = 1.0 / (FP8_MAX * 512.0)
"""Smallest per-token activation scale, so that an all-zero row divides by a positive number
(the floor vLLM's dynamic per-token fp8 kernels use)."""
_MIN_AMAX = 1e-30
"""Rows (groups) of weights whose absolute maximum is below this are zero for any purpose; they
get scale 1 so that no scale is zero or underflows, and quantize to zeros."""

SCHEMES = ("int8", "fp8", "w8a8")


@dataclass(frozen=True)
class LinearFormat:
    """How one quantized linear stores its weight and runs its matmul."""

    scheme: str
    """"int8" (weight-only), "fp8" or "w8a8" (int8 weights and activations)."""
    group_size: int | None = None
    """int8 only: input features sharing one scale; None for one scale per output channel."""
    activation_scale_ub: float | None = None
    """fp8 only: bound on each token's activation absolute maximum; None leaves it unbounded."""

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme={self.scheme!r}: must be one of {', '.join(SCHEMES)}")
        if self.group_size is not None:
            if self.scheme != "int8":
                raise ValueError(f"group_size={self.group_size}: only the int8 scheme has per-group scales")
            if not isinstance(self.group_size, int) or self.group_size <= 0:
                raise ValueError(f"group_size={self.group_size!r}: must be a positive integer or None")
        if self.activation_scale_ub is not None:
            if self.scheme != "fp8":
                raise ValueError(f"activation_scale_ub={self.activation_scale_ub}: only fp8 bounds its activations")
            if not 0 < self.activation_scale_ub < math.inf:  # JSON has no infinity to store it by
                raise ValueError(f"activation_scale_ub={self.activation_scale_ub!r}: must be finite and > 0, or None")


def count_non_finite(tensor: torch.Tensor) -> int:
    """How many NaN or inf values ``tensor`` holds (fp8 included, which ``isfinite`` does not take)."""
    if tensor.dtype == FP8_DTYPE:
        # e4m3fn has no inf; NaN is the pattern with exponent and mantissa all ones.
        return int(((tensor.view(torch.uint8) & 0x7F) == 0x7F).sum())
    return int((~torch.isfinite(tensor)).sum())


def num_groups(in_features: int, group_size: int | None) -> int:
    """Scales per output row: 1 per channel, else ``ceil(in_features / group_size)`` (the last may be short)."""
    return 1 if group_size is None else -(-in_features // group_size)


def _scale_from_amax(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    return torch.where(amax > _MIN_AMAX, amax / qmax, torch.ones_like(amax))


def _expand_groups(scale: torch.Tensor, in_features: int, group_size: int | None) -> torch.Tensor:
    """Scales [rows, groups] broadcastable against [rows, in_features] (per-channel ones already are)."""
    if group_size is None:
        return scale
    return scale.repeat_interleave(group_size, dim=1)[:, :in_features]


def quantize_int8(weight: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization of ``weight`` [out, in].

    Returns ``(q, scale)``: ``q`` int8 [out, in] in [-127, 127] and ``scale`` float32
    [out, 1] (per channel) or [out, ceil(in / group_size)] (per group).
    """
    w = weight.float()
    out_features, in_features = w.shape
    groups = num_groups(in_features, group_size)
    if group_size is None:
        amax = w.abs().amax(dim=1, keepdim=True)  # [out, 1]
    else:
        padded = torch.nn.functional.pad(w.abs(), (0, groups * group_size - in_features))
        amax = padded.view(out_features, groups, group_size).amax(dim=2)  # [out, groups]
    scale = _scale_from_amax(amax, INT8_MAX)
    q = torch.round(w / _expand_groups(scale, in_features, group_size)).clamp_(-INT8_MAX, INT8_MAX)
    return q.to(torch.int8), scale


def dequantize_int8(
    q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, group_size: int | None = None
) -> torch.Tensor:
    """``q * scale`` in ``dtype`` for int8 ``q`` [rows, in] and its scales [rows, 1] or [rows, groups]."""
    return (q.float() * _expand_groups(scale, q.shape[1], group_size)).to(dtype)


def quantize_fp8_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8 e4m3 quantization of ``weight`` [out, in] with one float32 scale per output channel.

    Returns ``(q, scale)``: ``q`` float8_e4m3fn [out, in], ``scale`` float32 [out, 1].
    """
    w = weight.float()
    scale = _scale_from_amax(w.abs().amax(dim=1, keepdim=True), FP8_MAX)
    # The cast does not saturate (out-of-range values become NaN), hence the clamp.
    return (w / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q * scale`` in ``dtype`` for float8 ``q`` [rows, cols] and per-row scales [rows, 1]."""
    return (q.float() * scale).to(dtype)


def quantize_fp8_activation(
    x: torch.Tensor, scale_ub: float | None = DEFAULT_ACTIVATION_SCALE_UB
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token fp8 quantization of activations ``x`` [tokens, features].

    Each row's absolute maximum is bounded by ``scale_ub`` (None: unbounded) and divided by
    448 to give its scale; values beyond the bound saturate at +-448 * scale. Returns
    ``(q, scale)``: ``q`` float8_e4m3fn [tokens, features], ``scale`` float32 [tokens, 1].
    Static shapes and no host reads, so it traces into one graph.
    """
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)  # [tokens, 1]
    if scale_ub is not None:
        amax = amax.clamp(max=scale_ub)
    scale = (amax / FP8_MAX).clamp(min=FP8_MIN_ACTIVATION_SCALE)
    return (xf / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def quantize_int8_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token int8 quantization of activations ``x`` [tokens, features].

    Each row's scale is its absolute maximum over 127 (an all-zero row gets the smallest
    positive scale and quantizes to zeros). Returns ``(q, scale)``: ``q`` int8 [tokens,
    features] in [-127, 127], ``scale`` float32 [tokens, 1]. Static shapes, no host reads.
    """
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / INT8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    return torch.round(xf / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8), scale

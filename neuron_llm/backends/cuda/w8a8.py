"""int8 W8A8 linears: per-token activation quantization in Triton, then cuBLASLt's int8 GEMM (``torch._int_mm``).

The int8 products are summed exactly in int32 and both scales applied afterwards, so the
result is ``quant.reference.w8a8_linear``'s up to that reference's float32 summation.
``torch._int_mm`` on CUDA wants more than 16 rows and in/out features divisible by 8: fewer
rows are padded with zeros, other widths go to the reference.

The activations are quantized by the row kernel the fp8 linears use, in its int8 mode
(``fp8.quantize_int8_per_token``). Not yet measured on a GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from neuron_llm.backends.cuda.fp8 import quantize_int8_per_token
from neuron_llm.quant import reference

INT_MM_MIN_ROWS = 17
INT_MM_ALIGNMENT = 8


def takes(weight: torch.Tensor) -> bool:
    """Whether ``torch._int_mm`` takes this [out, in] weight: both widths divisible by 8."""
    out_features, in_features = weight.shape
    return not (in_features % INT_MM_ALIGNMENT or out_features % INT_MM_ALIGNMENT)


def w8a8_linear(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ weight.T`` with ``x`` [..., in] quantized per token to int8 and ``weight`` int8 [out, in].

    ``weight_scale`` is float32 [out, 1]. Returns [..., out] in ``x.dtype``.
    """
    if not takes(weight):
        return reference.w8a8_linear(x, weight, weight_scale, bias)
    x_q, x_scale = quantize_int8_per_token(x)
    out = int8_scaled_mm(x_q, x_scale, weight, weight_scale, x.dtype, bias)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def int8_scaled_mm(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(x_q @ weight.T) * x_scale * weight_scale.T (+ bias)`` in ``out_dtype``, summed exactly in int32.

    ``x_q`` int8 [tokens, in] with float32 ``x_scale`` [tokens, 1]; ``weight`` as ``takes`` accepts.
    """
    num_rows = x_q.shape[0]
    if num_rows < INT_MM_MIN_ROWS:
        x_q = F.pad(x_q, (0, 0, 0, INT_MM_MIN_ROWS - num_rows))
    sums = torch._int_mm(x_q, weight.t())[:num_rows]  # int32 [tokens, out]
    out = (sums.float() * x_scale * weight_scale.t()).to(out_dtype)
    return out if bias is None else out + bias

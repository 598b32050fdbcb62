"""The int8 weight-only matmul (per-channel scales) as one NKI kernel, weight tile by weight tile.

The Tensor Engine multiplies 16-bit (or fp8, fp32) tiles, not int8 ones, and contracts over
the partition dimension of both operands. So the weight is kept transposed, [in, out]
(``NkiInt8Linear``, made once when the model is prepared), and padded to whole tiles; each
[128 in, 128 out] tile is read from HBM in 8 bits, widened to the activation's dtype in SBUF
and used as the stationary operand against the activations, which stream through::

    for each block of rows (tokens) r:
        x_t[:, r] for every 128-input tile into SBUF      (kept for every output tile)
        for each output tile n of 128 channels:
            acc[n, r] = sum over input tiles k of  widen(W_t[k, n]).T @ x_t[k, r]   (PSUM, fp32)
            out_t[n, r] = acc * scale[n]             (a channel a partition: one scale each)

The result comes out transposed, [out, tokens], and the wrapper transposes it back; the
activations go in transposed, [in, tokens]. So every DMA reads or writes whole rows; a
weight tile's rows are 128 bytes, though, where 512 (a [128, 512] load feeding four
accumulators) would move faster: one of the things to measure on a NeuronCore first.
Group-wise scales vary along the input: they would need the fp32 partial products of each
input tile scaled before adding, and stay on the XLA form.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from neuron_llm.quant.layers import Int8Linear, QuantizedLinear

try:  # the Neuron SDK; absent, the kernel stays a plain function that is never called
    import neuronxcc.nki.isa as nisa
    import neuronxcc.nki.language as nl
    from neuronxcc import nki
except Exception:  # the PyPI placeholders raise more than ImportError
    nki = nisa = nl = None

_jit = nki.jit if nki is not None else (lambda kernel: kernel)

PARTITIONS = 128
"""Input features a tile contracts, and output channels a tile makes (a partition each)."""

MAX_ROW_TILE = 512
"""Rows (tokens) of the streamed operand a matmul takes at most (one PSUM bank of fp32)."""

ACTIVATION_BYTES = 64 * 1024
"""SBUF bytes a partition gives a block of rows' activations: a third of the 176 KiB trn1's
compiler leaves a partition, so that two blocks in flight fit beside the weight tiles."""


def row_tile(in_features: int, num_rows: int, itemsize: int) -> int:
    """Rows of a block: at most ``MAX_ROW_TILE`` and as many as a block's activations for every
    input tile fit in ``ACTIVATION_BYTES`` a partition, the rows shared evenly between the
    fewest blocks (513 rows: two blocks of 257, not 512 and a padded 512). Inputs padded to
    whole tiles (``in_features`` a multiple of ``PARTITIONS``)."""
    most = max(1, min(MAX_ROW_TILE, ACTIVATION_BYTES // (in_features // PARTITIONS * itemsize)))
    return -(-num_rows // -(-num_rows // most))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class NkiInt8Linear(QuantizedLinear):
    """An ``Int8Linear`` with per-channel scales whose matmul is the NKI kernel.

    Its ``weight`` is the int8 weight transposed and padded to whole tiles, [in, out] (not a
    linear's [out, in]), and ``weight_scale`` a column, [out, 1] fp32; padding holds zero
    weights and unit scales. The same names and format as the layer it replaces, so the
    model's accounting and checks see an int8 linear (of the padded size it holds).
    """

    def __init__(self, linear: Int8Linear) -> None:
        if linear.group_size is not None:
            raise ValueError(f"the NKI int8 matmul takes per-channel scales, not groups of {linear.group_size}")
        # Not QuantizedLinear's __init__: it would allocate an [out, in] weight only to drop it.
        nn.Module.__init__(self)
        in_features, out_features = linear.in_features, linear.out_features
        self.in_features, self.out_features, self.format = in_features, out_features, linear.format
        padded_in, padded_out = _round_up(in_features, PARTITIONS), _round_up(out_features, PARTITIONS)
        weight_t = F.pad(linear.weight.detach().t(), (0, padded_out - out_features, 0, padded_in - in_features))
        scale = linear.weight_scale.detach().float().reshape(-1, 1)
        scale = F.pad(scale, (0, 0, 0, padded_out - out_features), value=1.0)
        self.weight = nn.Parameter(weight_t.contiguous(), requires_grad=False)
        self.weight_scale = nn.Parameter(scale.contiguous(), requires_grad=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if nki is None:
            raise RuntimeError("the NKI int8 matmul needs the Neuron SDK's neuronxcc.nki")
        x_t, tile = kernel_input(x, self.weight.shape[0])
        out_t = int8_matmul_kernel(x_t, self.weight, self.weight_scale, row_tile=tile)
        return kernel_output(out_t, x, self.out_features, self.bias)


def kernel_input(x: torch.Tensor, padded_in: int) -> tuple[torch.Tensor, int]:
    """``x`` [..., in] as the kernel's ``x_t`` [padded_in, padded rows], with its row tile."""
    rows = x.reshape(-1, x.shape[-1])
    tile = row_tile(padded_in, rows.shape[0], rows.element_size())
    rows = F.pad(rows, (0, padded_in - rows.shape[1], 0, _round_up(rows.shape[0], tile) - rows.shape[0]))
    return rows.t().contiguous(), tile


def kernel_output(out_t: torch.Tensor, x: torch.Tensor, out_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    """The kernel's ``out_t`` [padded out, padded rows] as the linear's output [..., out]."""
    num_rows = x.numel() // x.shape[-1]
    out = out_t[:out_features, :num_rows].t().reshape(*x.shape[:-1], out_features)
    return out if bias is None else out + bias


def replace_int8_linears(model: nn.Module) -> None:
    """Swap every per-channel ``Int8Linear`` of ``model`` for an ``NkiInt8Linear``; again, a
    no-op. ``ValueError`` when the model holds none: the kernel would change nothing."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            # Exact type: subclasses (tensor-parallel ones) reduce across ranks in their forward.
            if type(child) is Int8Linear and child.group_size is None:
                setattr(parent, name, NkiInt8Linear(child))
    if not any(isinstance(module, NkiInt8Linear) for module in model.modules()):
        raise ValueError(
            "nki_kernels: 'int8_matmul' runs int8 linears with per-channel scales (quantization 'int8' or "
            "'int8-head'), and this model has none"
        )


def int8_matmul_tiles(x_t: np.ndarray, weight_t: np.ndarray, scale: np.ndarray, row_tile: int) -> np.ndarray:
    """The kernel's tiles in NumPy: same inputs, same loops, fp32 products of the widened tiles."""
    in_features, num_rows = x_t.shape
    out_features = weight_t.shape[1]
    out_t = np.empty((out_features, num_rows), dtype=x_t.dtype)
    for r in range(0, num_rows, row_tile):
        x_tiles = x_t[:, r : r + row_tile].astype(np.float32)
        for n in range(0, out_features, PARTITIONS):
            acc = np.zeros((PARTITIONS, row_tile), dtype=np.float32)
            for k in range(0, in_features, PARTITIONS):
                widened = weight_t[k : k + PARTITIONS, n : n + PARTITIONS].astype(x_t.dtype).astype(np.float32)
                acc += widened.T @ x_tiles[k : k + PARTITIONS]
            out_t[n : n + PARTITIONS, r : r + row_tile] = (acc * scale[n : n + PARTITIONS]).astype(x_t.dtype)
    return out_t


@_jit
def int8_matmul_kernel(x_t, weight_t, scale, row_tile=MAX_ROW_TILE):
    """``out_t`` [out, rows] = ``(x @ (weight * scale).T).T`` from ``x_t`` [in, rows],
    ``weight_t`` [in, out] int8 and ``scale`` [out, 1] fp32; ``in`` and ``out`` multiples
    of ``PARTITIONS``, ``rows`` of ``row_tile``."""
    in_features, num_rows = x_t.shape
    out_features = weight_t.shape[1]
    num_k = in_features // PARTITIONS
    out_t = nl.ndarray((out_features, num_rows), dtype=x_t.dtype, buffer=nl.shared_hbm)
    i_p = nl.arange(PARTITIONS)[:, None]
    i_rows = nl.arange(row_tile)[None, :]
    i_out = nl.arange(PARTITIONS)[None, :]
    i_one = nl.arange(1)[None, :]
    for r in nl.affine_range(num_rows // row_tile):
        x_tiles = nl.ndarray((nl.par_dim(PARTITIONS), num_k * row_tile), dtype=x_t.dtype, buffer=nl.sbuf)
        for k in nl.affine_range(num_k):
            x_tiles[i_p, k * row_tile + i_rows] = nl.load(x_t[k * PARTITIONS + i_p, r * row_tile + i_rows])
        for n in nl.affine_range(out_features // PARTITIONS):
            acc = nl.zeros((nl.par_dim(PARTITIONS), row_tile), dtype=nl.float32, buffer=nl.psum)
            for k in nl.affine_range(num_k):
                weight = nl.load(weight_t[k * PARTITIONS + i_p, n * PARTITIONS + i_out])  # int8
                acc += nisa.nc_matmul(nl.copy(weight, dtype=x_t.dtype), x_tiles[i_p, k * row_tile + i_rows])
            channel_scale = nl.load(scale[n * PARTITIONS + i_p, i_one])  # [PARTITIONS, 1]
            nl.store(
                out_t[n * PARTITIONS + i_p, r * row_tile + i_rows],
                value=nl.multiply(acc, channel_scale, dtype=x_t.dtype),
            )
    return out_t

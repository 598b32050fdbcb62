"""Top-p truncation of sampling logits without sorting the vocabulary.

Sorting every row of a 128k vocabulary each step (the reference's way) is the largest cost
of sampling a batch with top-p. Truncation only needs each row's threshold, the smallest
probability of its top-p set. One program a row finds it by bisection: the unnormalised
probabilities ``exp(x - max)`` are written over the output row, and each bisection step is
one pass over the row (which stays in L2), summing the weights whose bits are at or above the
step's midpoint: positive floats' bits order as the floats do. The result is the largest
``T`` whose tokens at or above it hold ``top_p`` of the mass (about 30 passes); the last pass
writes ``-inf`` below it. Tokens tied at the threshold are all kept (the reference keeps or
drops ties in its sort's order).

Top-k stays with the sort: a bisection for the k-th largest logit was slower than the sort
below 64 rows (BENCHMARKS.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096
NUM_WARPS = 8
MIN_ROWS = 4
"""Fewer rows leave most multiprocessors idle through the passes, and the sort is as fast
then (BENCHMARKS.md)."""


@triton.jit
def _mass_at_least(weight_ptr, threshold, vocab, BLOCK: tl.constexpr):
    mass = tl.zeros([BLOCK], tl.float32)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        weight = tl.load(weight_ptr + cols, mask=cols < vocab, other=0.0)
        mass += tl.where(weight.to(tl.int32, bitcast=True) >= threshold, weight, 0.0)
    return tl.sum(mass, axis=0)


@triton.jit
def _top_p_kernel(x_ptr, out_ptr, top_p_ptr, stride_x, stride_out, vocab, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    x_row = x_ptr + row.to(tl.int64) * stride_x
    out_row = out_ptr + row.to(tl.int64) * stride_out
    top_p = tl.load(top_p_ptr + row)
    if top_p >= 1.0:
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            tl.store(out_row + cols, tl.load(x_row + cols, mask=cols < vocab), mask=cols < vocab)
        return

    row_max = tl.full([BLOCK], float("-inf"), tl.float32)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        row_max = tl.maximum(row_max, tl.load(x_row + cols, mask=cols < vocab, other=float("-inf")))
    x_max = tl.max(row_max, axis=0)
    total = tl.zeros([BLOCK], tl.float32)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        weight = tl.exp(tl.load(x_row + cols, mask=cols < vocab, other=float("-inf")) - x_max)
        tl.store(out_row + cols, weight, mask=cols < vocab)
        total += weight
    target = top_p * tl.sum(total, axis=0)
    tl.debug_barrier()  # the weights written above are read by other threads below

    # Every weight is at or above bits 0 and below the bits of 1.0 plus one, as exp(x - max) <= 1.
    # The zero weights (bits 0) are never kept: the positive ones alone hold all the mass.
    low = tl.full([], 0, tl.int32)
    high = tl.full([], 0x3F800001, tl.int32)
    while high - low > 1:
        mid = low + (high - low) // 2
        if _mass_at_least(out_row, mid, vocab, BLOCK) >= target:
            low = mid
        else:
            high = mid
    tl.debug_barrier()

    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_row + cols, mask=cols < vocab)
        weight = tl.load(out_row + cols, mask=cols < vocab, other=0.0)
        tl.store(
            out_row + cols, tl.where(weight.to(tl.int32, bitcast=True) >= low, x, float("-inf")), mask=cols < vocab
        )


def takes(logits: torch.Tensor) -> bool:
    """Whether the backend sends these logits here: on the GPU, enough rows, and the fp32
    [rows, vocab] with contiguous rows that ``top_p`` takes (other logits go to the sort)."""
    return (
        logits.is_cuda
        and logits.dim() == 2
        and logits.dtype == torch.float32
        and logits.stride(1) == 1
        and logits.shape[0] >= MIN_ROWS
    )


def top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """``logits`` [rows, vocab] fp32 with ``-inf`` where a row's top-p (fp32 [rows], 1 for
    none) drops the token; a new tensor."""
    if logits.dim() != 2 or logits.dtype != torch.float32 or logits.stride(1) != 1:
        raise ValueError(f"top_p takes fp32 logits [rows, vocab] with contiguous rows, got {tuple(logits.shape)}")
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _top_p_kernel[(logits.shape[0],)](
        logits, out, top_p, logits.stride(0), out.stride(0), logits.shape[1], BLOCK=BLOCK, num_warps=NUM_WARPS
    )
    return out

"""Top-k and top-p truncation of sampling logits without sorting the vocabulary.

Sorting every row of a 128k vocabulary each step (the reference's way without a top-k
bound) is the largest cost of sampling a batch with top-p. Truncation only needs each row's
threshold. Two kernels, one program a row:

- ``top_p`` (top-p alone) finds the smallest probability of the top-p set by bisection: the
  unnormalised probabilities ``exp(x - max)`` are written over the output row, and each
  bisection step is one pass over the row (which stays in L2), summing the weights whose bits
  are at or above the step's midpoint: positive floats' bits order as the floats do. The
  result is the largest ``T`` whose tokens at or above it hold ``top_p`` of the mass (about 30
  passes); the last pass writes ``-inf`` below it.
- ``top_k_top_p`` (top-k, with or without top-p) takes each row's largest logits from
  ``torch.topk`` and does the rest of the reference's ``select_top_k_top_p`` in one launch:
  top-k's threshold, top-p's over top-k's survivors (a running sum over a few values), one
  pass to count survivors tied past the selection and one to write the row. In torch those
  steps are some 35 small kernels, whose launches cost the host about a millisecond.

Tokens tied at top-p's threshold are all kept (the sort keeps or drops ties in its order).
A bisection for the k-th largest logit was slower than the sort below 64 rows (BENCHMARKS.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from neuron_llm.backends.cuda import launch
from neuron_llm.backends.truncation import SELECT_MAX_K

BLOCK = 4096
NUM_WARPS = 8
MIN_ROWS = 4
"""Top-p alone: fewer rows leave most multiprocessors idle through the passes, and the sort is
as fast then (BENCHMARKS.md)."""


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


@triton.jit
def _top_k_top_p_kernel(
    x_ptr, values_ptr, out_ptr, top_k_ptr, top_p_ptr, stride_x, stride_values, stride_out, vocab, bound,
    HAS_TOP_P: tl.constexpr, BOUND: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    x_row = x_ptr + row.to(tl.int64) * stride_x
    out_row = out_ptr + row.to(tl.int64) * stride_out
    offs = tl.arange(0, BOUND)
    values = tl.load(values_ptr + row.to(tl.int64) * stride_values + offs, mask=offs < bound, other=float("-inf"))
    top_k = tl.load(top_k_ptr + row)
    kth = tl.max(tl.where(offs == tl.minimum(top_k, bound) - 1, values, float("-inf")), axis=0)
    threshold = tl.where(top_k > bound, float("-inf"), kth)
    if HAS_TOP_P:
        top_p = tl.load(top_p_ptr + row)
        if top_p < 1.0:
            # As select_top_k_top_p: survivors past the selection are tied with the k-th
            # largest logit and add to the total only.
            survivors = (values >= threshold) & (offs < bound)
            largest = tl.max(values, axis=0)
            weights = tl.where(survivors, tl.exp(values - largest), 0.0)
            cumulative = tl.cumsum(weights, axis=0)
            tied = tl.zeros([BLOCK], tl.int32)
            for start in range(0, vocab, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                x = tl.load(x_row + cols, mask=cols < vocab, other=float("-inf"))
                tied += (x >= threshold).to(tl.int32)
            extra = tl.sum(tied, axis=0) - tl.sum(survivors.to(tl.int32), axis=0)
            total = tl.max(cumulative, axis=0) + extra.to(tl.float32) * tl.exp(threshold - largest)
            first = tl.minimum(tl.sum((cumulative < top_p * total).to(tl.int32), axis=0), bound - 1)
            threshold = tl.maximum(threshold, tl.max(tl.where(offs == first, values, float("-inf")), axis=0))
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_row + cols, mask=cols < vocab)
        tl.store(out_row + cols, tl.where(x < threshold, float("-inf"), x), mask=cols < vocab)


def takes(logits: torch.Tensor) -> bool:
    """Whether these kernels take the logits: fp32 [rows, vocab] on the GPU, rows contiguous."""
    return logits.is_cuda and _is_row_major_fp32(logits)


def top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """``logits`` [rows, vocab] fp32 with ``-inf`` where a row's top-p (fp32 [rows], 1 for
    none) drops the token; a new tensor."""
    _check_logits(logits)
    launch.check_per_row("top_p", top_p, logits.shape[0])
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _top_p_kernel[(logits.shape[0],)](
        logits, out, top_p, logits.stride(0), out.stride(0), logits.shape[1], BLOCK=BLOCK, num_warps=NUM_WARPS
    )
    return out


def top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor | None, bound: int) -> torch.Tensor:
    """``select_top_k_top_p`` of ``neuron_llm.backends.truncation`` (same arguments and
    contract) for fp32 [rows, vocab] logits with contiguous rows; a new tensor."""
    _check_logits(logits)
    for name, values in (("top_k", top_k), ("top_p", top_p)):
        if values is not None:
            launch.check_per_row(name, values, logits.shape[0])
    vocab = logits.shape[1]
    if not 1 <= bound <= min(vocab, SELECT_MAX_K):
        raise ValueError(f"bound={bound} must be in [1, {min(vocab, SELECT_MAX_K)}]")
    values = logits.topk(bound, dim=-1).values
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _top_k_top_p_kernel[(logits.shape[0],)](
        logits, values, out, top_k, top_k if top_p is None else top_p,
        logits.stride(0), values.stride(0), out.stride(0), vocab, bound,
        HAS_TOP_P=top_p is not None, BOUND=triton.next_power_of_2(bound), BLOCK=BLOCK, num_warps=NUM_WARPS,
    )  # fmt: skip
    return out


def _is_row_major_fp32(logits: torch.Tensor) -> bool:
    return logits.dim() == 2 and logits.dtype == torch.float32 and logits.stride(1) == 1


def _check_logits(logits: torch.Tensor) -> None:
    if not _is_row_major_fp32(logits):
        raise ValueError(f"truncation takes fp32 logits [rows, vocab] with contiguous rows, got {tuple(logits.shape)}")

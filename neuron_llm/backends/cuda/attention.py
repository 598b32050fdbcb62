"""Triton kernels for causal attention over the paged KV cache.

Two kernels read K/V through each sequence's block table (``block_size`` tokens a page; a
key tile may span several pages, each row gathered from its own page):

- ``prefill_attention``: flash attention (online softmax, fp32 accumulators; Dao et al.,
  https://arxiv.org/abs/2205.14135) over the flat varlen batch. A program owns one query
  tile of one sequence and the query heads that share one KV head, packed into the rows of
  the tile, so each K/V tile it loads serves all of them::

      tile rows: (token 0, head 0) (token 0, head 1) ... (token 1, head 0) ...

  Programs find their sequence without the host: sequence ``s`` owns the tiles
  ``query_start_loc[s] // BLOCK_Q + s`` up to the next sequence's first tile (always enough
  for its tokens; a spare tile exits at once), found by a binary search. One extra pseudo
  sequence after the last owns the padding tokens and writes their rows as zeros.
  Tiles launch last first (they see the most keys). When the keys and values of the whole
  batch fit in L2, the query heads of one tile launch together, so the longest tiles of
  every head start in the first wave; otherwise all tiles of one head launch together, so the
  programs running at once read the same head's keys and values from L2.
  A step of few tokens over a long context (verifying drafted tokens, a short chunk) makes
  few tiles, each of which would read the whole context alone: there each tile's context is
  split along the keys as in decode (``prefill_num_splits``, from shapes only), and the last
  split to finish combines the partial outputs.
- ``decode_attention``: flash-decoding (https://pytorch.org/blog/flash-decoding/) for steps
  with one query per sequence. Programs (sequence, KV head, split) each attend over one run
  of whole key tiles of their sequence's context, at most ``num_splits`` runs; the last run
  to finish combines the partial outputs by their log-sum-exp (``launch.split_counters``),
  and a context of one run is written directly. The grid depends only on shapes (query rows,
  KV heads and a split count chosen from the block-table width), never on sequence lengths,
  so the call can be captured in a CUDA graph; splits past a sequence's end exit at once.
  Launched with programmatic dependent launch (``launch.py``).

Softmax runs in base 2: scores are scaled by ``scale * log2(e)`` and exponentiated with exp2.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from neuron_llm.backends.cuda import launch

if TYPE_CHECKING:
    from neuron_llm.ops.metadata import AttentionMetadata

LOG2_E = 1.4426950408889634
MAX_HEAD_DIM = 256
MIN_TOKENS_PER_TILE = 16
"""Prefill packs at most as many query heads into a tile as leaves this many tokens in it."""
MIN_SPLIT_LEN = 256
"""Prefill: no split of a full-width context gets fewer keys than this."""
MAX_SPLITS = 64
DECODE_MIN_SPLIT_LEN = 64
DECODE_MAX_SPLITS = 32
"""Decode: at most this many splits, each of at least ``DECODE_MIN_SPLIT_LEN`` keys (one
64-key tile) of a full-width context. Past 32 splits the combine's trips through the
partials cost more than the programs gain (H100: 32k keys at batch 1, 54.5 us in 32 splits
against 55.8 in 64)."""
MAX_PARTIAL_BYTES = 64 << 20
"""Prefill: the most bytes of partial outputs its splits may write."""
COMBINE_PAIRS = 32
"""Decode: (split, query head) partials the combining program reads at once."""
COMBINE_ONE_TRIP_SPLITS = 32
COMBINE_ONE_TRIP_PAIRS = 128
"""Decode with ``COMBINE_ONE_TRIP_SPLITS`` splits or more (batch 1): the partials read at once
instead, all 32 splits of 4 query heads in one trip. H100, batch 1, 32 splits: 8k keys 18.5-18.7
us against 20.1-20.3 in four trips of 8 splits, 2k 9.1-9.2 against 10.4-10.5. One trip of 16
splits ran slower than two of 8 (batch 2, 1k keys: 10.5 us against 9.4-9.5), so fewer splits
keep ``COMBINE_PAIRS``."""
PREFILL_COMBINE_ROWS = 16
PREFILL_COMBINE_PAIRS = 64
"""Prefill: the combining program's output rows at a time, and (split, row) partials read at once."""


@dataclass(frozen=True)
class PrefillConfig:
    """Launch parameters of the prefill kernel."""

    block_m: int
    """Rows of a query tile: tokens x packed query heads."""
    block_n: int
    """Keys per K/V tile."""
    num_warps: int
    num_stages: int
    maxnreg: int | None = None
    """Registers a thread may hold, when set: at 128, two programs of 8 warps share a
    multiprocessor, so one's tensor-core work overlaps the other's softmax."""


@dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters of the decode kernel."""

    block_n: int
    """Keys per K/V tile."""
    num_warps: int
    num_stages: int


# Keyed by the head dimension padded to a power of two; measured on an H100 for 16-bit inputs
# (``benchmarks/attention_kernels.py --sweep``), head_dim 128 again on an H200 (BENCHMARKS.md).
# 32-bit inputs take half-size tiles.
PREFILL_CONFIGS: dict[int, PrefillConfig] = {
    16: PrefillConfig(block_m=128, block_n=64, num_warps=4, num_stages=3),
    32: PrefillConfig(block_m=128, block_n=64, num_warps=4, num_stages=3),
    64: PrefillConfig(block_m=128, block_n=64, num_warps=4, num_stages=3),
    128: PrefillConfig(block_m=128, block_n=64, num_warps=8, num_stages=3, maxnreg=128),
    256: PrefillConfig(block_m=64, block_n=32, num_warps=4, num_stages=2),
}
FEW_QUERY_MAX_TOKENS = 128
"""Prefill steps of at most this many tokens (drafted tokens verified, decode rows of a mixed
step, short chunks) use ``FEW_QUERY_CONFIGS``, and their split count assumes a sequence every
``FEW_QUERY_TOKENS_PER_SEQ`` tokens."""
FEW_QUERY_TOKENS_PER_SEQ = 8
FEW_QUERY_CONFIGS: dict[int, PrefillConfig] = {
    128: PrefillConfig(block_m=64, block_n=64, num_warps=4, num_stages=2),
}
"""Smaller tiles for few queries a sequence: 5 queries of 4 heads fill 20 rows of a tile. On an
H200 (BENCHMARKS.md), 0.77-0.81x the time of the prompt tiles for 5 queries over 2k-8k keys."""
DECODE_CONFIGS: dict[int, DecodeConfig] = {
    16: DecodeConfig(block_n=128, num_warps=4, num_stages=3),
    32: DecodeConfig(block_n=128, num_warps=4, num_stages=3),
    64: DecodeConfig(block_n=64, num_warps=4, num_stages=3),
    128: DecodeConfig(block_n=64, num_warps=4, num_stages=3),
    256: DecodeConfig(block_n=32, num_warps=4, num_stages=2),
}


@triton.jit
def _load_kv_tile(
    key_cache_ptr,
    value_cache_ptr,
    table_row_ptr,
    positions,
    kv_head,
    offs_d,
    mask,
    stride_cache_block,
    stride_cache_offset,
    stride_cache_head,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    IS_MASKED: tl.constexpr,
):
    """K and V [BLOCK_N, BLOCK_D] at ``positions`` of one sequence, each row from its page.

    Masked positions read the null block (and zeros): the table may end before the tile does,
    and an unwritten cache may hold NaN.
    """
    if IS_MASKED:
        block_ids = tl.load(table_row_ptr + positions // BLOCK_SIZE, mask=mask, other=0)
    else:
        block_ids = tl.load(table_row_ptr + positions // BLOCK_SIZE)
    # int64: a large pool overflows int32 element offsets.
    rows = (
        block_ids.to(tl.int64) * stride_cache_block
        + (positions % BLOCK_SIZE) * stride_cache_offset
        + kv_head * stride_cache_head
    )
    offsets = rows[:, None] + offs_d[None, :]
    if IS_MASKED:
        tile_mask = mask[:, None] & (offs_d[None, :] < HEAD_DIM)
        key = tl.load(key_cache_ptr + offsets, mask=tile_mask, other=0.0)
        value = tl.load(value_cache_ptr + offsets, mask=tile_mask, other=0.0)
    elif HEAD_DIM != BLOCK_D:
        key = tl.load(key_cache_ptr + offsets, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        value = tl.load(value_cache_ptr + offsets, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    else:
        key = tl.load(key_cache_ptr + offsets)
        value = tl.load(value_cache_ptr + offsets)
    return key, value


@triton.jit
def _attend_tile(
    query,
    key,
    value,
    acc,
    m_i,
    l_i,
    mask,
    scale_log2,
    IS_MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One online-softmax step: fold a K/V tile into the running max, sum and output."""
    scores = tl.dot(query, tl.trans(key), input_precision=DOT_PRECISION)  # [M, BLOCK_N], unscaled
    if IS_MASKED:
        scores = tl.where(mask, scores, float("-inf"))
    # The scale is positive: it scales the row maxima, and each score in one FMA with the max.
    m_new = tl.maximum(m_i, tl.max(scores, 1) * scale_log2)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores * scale_log2 - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(value.dtype), value, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _find_sequence(query_start_loc_ptr, num_seqs, tile_id, BLOCK_Q: tl.constexpr):
    """The largest ``s`` in [0, num_seqs] whose first tile ``query_start_loc[s] // BLOCK_Q + s``
    is at most ``tile_id`` (``s == num_seqs``: the padding tokens)."""
    low = tl.program_id(0) * 0
    high = low + num_seqs + 1
    while high - low > 1:
        mid = (low + high) // 2
        is_at_or_before = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid <= tile_id
        low = tl.where(is_at_or_before, mid, low)
        high = tl.where(is_at_or_before, high, mid)
    return low


@triton.jit
def _prefill_kernel(
    query_ptr,
    key_cache_ptr,
    value_cache_ptr,
    out_ptr,
    partial_out_ptr,
    partial_lse_ptr,
    counter_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    scale_log2,
    num_seqs,
    num_tokens,
    num_tiles,
    num_heads,
    stride_query_token,
    stride_query_head,
    stride_out_token,
    stride_out_head,
    stride_cache_block,
    stride_cache_offset,
    stride_cache_head,
    stride_table_seq,
    QUERY_HEADS_PER_KV: tl.constexpr,
    HEADS_PER_PROGRAM: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    COMBINE_ROWS: tl.constexpr,
    COMBINE_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HEADS_FIRST: tl.constexpr,
):
    # Later tiles see more keys under the causal mask: launch them first to shorten the tail.
    if HEADS_FIRST:
        head_group = tl.program_id(0)
        tile_id = num_tiles - 1 - tl.program_id(1)
    else:
        tile_id = num_tiles - 1 - tl.program_id(0)
        head_group = tl.program_id(1)
    split = tl.program_id(2)
    seq = _find_sequence(query_start_loc_ptr, num_seqs, tile_id, BLOCK_Q)
    query_start = tl.load(query_start_loc_ptr + seq)
    is_padding = seq == num_seqs
    query_end = tl.where(is_padding, num_tokens, tl.load(query_start_loc_ptr + seq + 1, mask=seq < num_seqs, other=0))
    query_len = query_end - query_start
    tile_start = (tile_id - (query_start // BLOCK_Q + seq)) * BLOCK_Q  # first query of the tile, in the sequence
    if tile_start >= query_len:
        return

    # Rows of the tile: (token, head) pairs, the heads of one KV head side by side.
    rows = tl.arange(0, BLOCK_M)
    query_index = tile_start + rows // HEADS_PER_PROGRAM  # [BLOCK_M] within the sequence's queries
    head = head_group * HEADS_PER_PROGRAM + rows % HEADS_PER_PROGRAM
    row_mask = (rows < BLOCK_Q * HEADS_PER_PROGRAM) & (query_index < query_len)
    token = (query_start + query_index).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    io_mask = row_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
    out_ptrs = out_ptr + token[:, None] * stride_out_token + head[:, None] * stride_out_head + offs_d[None, :]
    if is_padding:
        if split == 0:
            tl.store(out_ptrs, tl.zeros([BLOCK_M, BLOCK_D], out_ptr.dtype.element_ty), mask=io_mask)
        return

    query_ptrs = query_ptr + token[:, None] * stride_query_token + head[:, None] * stride_query_head + offs_d[None, :]
    query = tl.load(query_ptrs, mask=io_mask, other=0.0)  # [BLOCK_M, BLOCK_D]
    kv_head = head_group * HEADS_PER_PROGRAM // QUERY_HEADS_PER_KV
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - query_len  # keys cached before this step's first query
    query_pos = context_len + query_index
    first_pos = context_len + tile_start
    kv_end = tl.minimum(first_pos + BLOCK_Q, seq_len)
    # Keys before the tile's first query are seen by every row: no mask for those tiles.
    unmasked_end = (first_pos // BLOCK_N) * BLOCK_N
    if NUM_SPLITS == 1:
        start = 0
        end = unmasked_end
        takes_tail = True
    else:
        # Splits cut those keys into runs of whole key tiles; the last run also takes the masked
        # tail, so that every run has keys for every row (a row with none would divide 0 by 0).
        split_len = tl.maximum(tl.cdiv(tl.cdiv(unmasked_end, NUM_SPLITS), BLOCK_N), 1) * BLOCK_N
        num_active = tl.maximum(tl.cdiv(unmasked_end, split_len), 1)
        if split >= num_active:
            return
        start = split * split_len
        end = tl.minimum(start + split_len, unmasked_end)
        takes_tail = split == num_active - 1
    table_row_ptr = block_tables_ptr + seq.to(tl.int64) * stride_table_seq

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(start, end, BLOCK_N):
        positions = start_n + offs_n
        key, value = _load_kv_tile(
            key_cache_ptr, value_cache_ptr, table_row_ptr, positions, kv_head, offs_d, None,
            stride_cache_block, stride_cache_offset, stride_cache_head,
            HEAD_DIM, BLOCK_D, BLOCK_SIZE, False,
        )  # fmt: skip
        acc, m_i, l_i = _attend_tile(query, key, value, acc, m_i, l_i, None, scale_log2, False, DOT_PRECISION)
    if takes_tail:
        for start_n in range(unmasked_end, kv_end, BLOCK_N):
            positions = start_n + offs_n
            key, value = _load_kv_tile(
                key_cache_ptr, value_cache_ptr, table_row_ptr, positions, kv_head, offs_d, positions < kv_end,
                stride_cache_block, stride_cache_offset, stride_cache_head,
                HEAD_DIM, BLOCK_D, BLOCK_SIZE, True,
            )  # fmt: skip
            causal = positions[None, :] <= query_pos[:, None]
            acc, m_i, l_i = _attend_tile(query, key, value, acc, m_i, l_i, causal, scale_log2, True, DOT_PRECISION)

    # Every row sees a key of every run, so l_i > 0.
    out = acc / l_i[:, None]
    if NUM_SPLITS == 1:
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=io_mask)
    elif num_active == 1:
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=io_mask)
    else:
        # partial_out: [num_tokens, NUM_SPLITS, num_heads, HEAD_DIM]; partial_lse: [num_tokens, NUM_SPLITS, num_heads]
        partial_row = (token * NUM_SPLITS + split) * num_heads + head
        tl.store(partial_out_ptr + partial_row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=io_mask)
        tl.store(partial_lse_ptr + partial_row, m_i + tl.log2(l_i), mask=row_mask)
        # The last split of this tile and head group to finish combines them all (launch.py).
        tl.debug_barrier()
        counter = counter_ptr + tile_id * (num_heads // HEADS_PER_PROGRAM) + head_group
        if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == num_active - 1:
            num_rows = tl.minimum(query_len - tile_start, BLOCK_Q) * HEADS_PER_PROGRAM
            for first_row in range(0, num_rows, COMBINE_ROWS):
                _combine_splits(
                    partial_out_ptr, partial_lse_ptr, out_ptr,
                    query_start + tile_start, head_group * HEADS_PER_PROGRAM, first_row, num_rows, num_active,
                    num_heads, stride_out_token, stride_out_head,
                    HEADS_PER_PROGRAM, COMBINE_ROWS, COMBINE_SPLITS, HEAD_DIM, BLOCK_D, NUM_SPLITS,
                )  # fmt: skip
            tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")


@triton.jit
def _decode_kernel(
    query_ptr,
    key_cache_ptr,
    value_cache_ptr,
    out_ptr,
    partial_out_ptr,
    partial_lse_ptr,
    counter_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    scale_log2,
    num_table_seqs,
    num_heads,
    num_kv_heads,
    stride_query_token,
    stride_query_head,
    stride_out_token,
    stride_out_head,
    stride_cache_block,
    stride_cache_offset,
    stride_cache_head,
    stride_table_seq,
    QUERY_HEADS_PER_KV: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    COMBINE_HEADS: tl.constexpr,
    COMBINE_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    launch.wait_for_inputs(USE_PDL)
    # Query rows past the block table's rows are padding too.
    seq_len = tl.load(seq_lens_ptr + seq, mask=seq < num_table_seqs, other=0)
    # Each sequence is cut into runs of whole key tiles, at most NUM_SPLITS of them.
    split_len = tl.maximum(tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N), 1) * BLOCK_N
    num_active = tl.cdiv(seq_len, split_len)
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    rows = tl.arange(0, BLOCK_H)  # query heads of this KV head, padded to a tl.dot-sized M
    head = kv_head * QUERY_HEADS_PER_KV + rows
    row_mask = rows < QUERY_HEADS_PER_KV
    offs_d = tl.arange(0, BLOCK_D)
    io_mask = row_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
    out_ptrs = out_ptr + seq.to(tl.int64) * stride_out_token + head[:, None] * stride_out_head + offs_d[None, :]
    if start >= end:
        if split == 0:  # an empty sequence (padding): zeros
            tl.store(out_ptrs, tl.zeros([BLOCK_H, BLOCK_D], out_ptr.dtype.element_ty), mask=io_mask)
        return

    query_ptrs = query_ptr + seq.to(tl.int64) * stride_query_token + head[:, None] * stride_query_head + offs_d[None, :]
    query = tl.load(query_ptrs, mask=io_mask, other=0.0)  # [BLOCK_H, BLOCK_D]
    table_row_ptr = block_tables_ptr + seq.to(tl.int64) * stride_table_seq
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(start, end, BLOCK_N):
        positions = start_n + offs_n
        key_mask = positions < end
        key, value = _load_kv_tile(
            key_cache_ptr, value_cache_ptr, table_row_ptr, positions, kv_head, offs_d, key_mask,
            stride_cache_block, stride_cache_offset, stride_cache_head,
            HEAD_DIM, BLOCK_D, BLOCK_SIZE, True,
        )  # fmt: skip
        acc, m_i, l_i = _attend_tile(
            query, key, value, acc, m_i, l_i, key_mask[None, :], scale_log2, True, DOT_PRECISION
        )

    out = acc / l_i[:, None]
    if NUM_SPLITS == 1:
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=io_mask)
    elif num_active == 1:
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=io_mask)
    else:
        # partial_out: [num_rows, NUM_SPLITS, num_heads, HEAD_DIM]; partial_lse: [num_rows, NUM_SPLITS, num_heads]
        first_row = seq.to(tl.int64) * NUM_SPLITS * num_heads + head
        partial_row = first_row + split * num_heads
        tl.store(partial_out_ptr + partial_row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=io_mask)
        tl.store(partial_lse_ptr + partial_row, m_i + tl.log2(l_i), mask=row_mask)
        # The last split of this (sequence, KV head) to finish combines them all (launch.py).
        tl.debug_barrier()
        counter = counter_ptr + seq * num_kv_heads + kv_head
        if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == num_active - 1:
            _combine_splits(
                partial_out_ptr, partial_lse_ptr, out_ptr,
                seq, kv_head * QUERY_HEADS_PER_KV, 0, QUERY_HEADS_PER_KV, num_active, num_heads,
                stride_out_token, stride_out_head,
                QUERY_HEADS_PER_KV, COMBINE_HEADS, COMBINE_SPLITS, HEAD_DIM, BLOCK_D, NUM_SPLITS,
            )  # fmt: skip
            tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")


@triton.jit
def _combine_splits(
    partial_out_ptr,
    partial_lse_ptr,
    out_ptr,
    first_token,
    first_head,
    first_row,
    num_rows,
    num_active,
    num_heads,
    stride_out_token,
    stride_out_head,
    HEADS_PER_TOKEN: tl.constexpr,
    ROWS: tl.constexpr,
    COMBINE_SPLITS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    """Write ``ROWS`` output rows from their ``num_active`` split partials.

    Output rows are (token, head) pairs, heads fastest: row ``r`` (from ``first_row``, below
    ``num_rows``) is head ``first_head + r % HEADS_PER_TOKEN`` of token ``first_token + r //
    HEADS_PER_TOKEN``. Partials are read COMBINE_SPLITS splits at a time, all the rows at once:
    one trip to L2 per chunk, not one per split. Weights 2^(lse - max lse), summed in split
    order, so the result is the same every time.
    """
    pairs = tl.arange(0, COMBINE_SPLITS * ROWS)  # (split, row) pairs, row fastest
    split_of_pair = pairs // ROWS
    row_of_pair = first_row + pairs % ROWS
    is_row = row_of_pair < num_rows
    token = (first_token + row_of_pair // HEADS_PER_TOKEN).to(tl.int64)
    head = first_head + row_of_pair % HEADS_PER_TOKEN
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    lse_max = tl.full([ROWS], float("-inf"), tl.float32)
    total = tl.zeros([ROWS], tl.float32)
    combined = tl.zeros([ROWS, BLOCK_D], tl.float32)
    for base in range(0, num_active, COMBINE_SPLITS):
        split = base + split_of_pair
        is_used = is_row & (split < num_active)
        partial_row = (token * NUM_SPLITS + split) * num_heads + head
        # Splits past the last weigh 2^-inf = 0; rows past the last read 0 so that no max is -inf.
        lse = tl.load(partial_lse_ptr + partial_row, mask=is_used, other=0.0, cache_modifier=".cg")
        lse = tl.where(is_row & ~is_used, float("-inf"), lse)
        part = tl.load(
            partial_out_ptr + partial_row[:, None] * HEAD_DIM + offs_d[None, :],
            mask=is_used[:, None] & d_mask[None, :],
            other=0.0,
            cache_modifier=".cg",
        )
        lse = tl.reshape(lse, [COMBINE_SPLITS, ROWS])
        part = tl.reshape(part, [COMBINE_SPLITS, ROWS, BLOCK_D])
        new_max = tl.maximum(lse_max, tl.max(lse, axis=0))
        rescale = tl.exp2(lse_max - new_max)
        weight = tl.exp2(lse - new_max[None, :])  # [COMBINE_SPLITS, ROWS]
        total = total * rescale + tl.sum(weight, axis=0)
        combined = combined * rescale[:, None] + tl.sum(weight[:, :, None] * part, axis=0)
        lse_max = new_max
    rows = first_row + tl.arange(0, ROWS)
    out_token = (first_token + rows // HEADS_PER_TOKEN).to(tl.int64)
    out_head = first_head + rows % HEADS_PER_TOKEN
    out_ptrs = out_ptr + out_token[:, None] * stride_out_token + out_head[:, None] * stride_out_head + offs_d[None, :]
    mask = (rows[:, None] < num_rows) & d_mask[None, :]
    tl.store(out_ptrs, (combined / total[:, None]).to(out_ptr.dtype.element_ty), mask=mask)


def prefill_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    out: torch.Tensor | None = None,
    config: PrefillConfig | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Causal attention of a flat varlen batch over the paged KV cache.

    ``query`` is [num_tokens, num_heads, head_dim]; the caches are [num_blocks, block_size,
    num_kv_heads, head_dim] and already hold this step's keys and values. Each sequence's
    queries are the last ``query_len`` tokens of its context. Returns ``out`` (allocated when
    None) [num_tokens, num_heads, head_dim] with padding tokens' rows zero. Reads no device
    tensor on the host. ``config`` overrides the launch parameters of ``default_prefill_config``,
    ``num_splits`` (1 to ``MAX_SPLITS``) the context splits of ``prefill_num_splits``.
    """
    num_tokens, num_heads, head_dim = query.shape
    block_size, num_kv_heads = key_cache.shape[1:3]
    block_d = _check_inputs(query, key_cache, value_cache, metadata)
    out = _output(query, out)
    if num_tokens == 0:
        return out
    config = config or default_prefill_config(num_tokens, block_d, query.dtype)
    group_size = num_heads // num_kv_heads
    heads_per_program = _heads_per_program(group_size, config.block_m)
    block_q = config.block_m // heads_per_program
    num_head_groups = num_heads // heads_per_program
    num_seqs = metadata.query_start_loc.shape[0] - 1
    # Sequence s owns tiles query_start_loc[s] // block_q + s ...; the padding tokens the last ones.
    num_tiles = num_tokens // block_q + num_seqs + 1
    if num_splits is None:
        num_splits = prefill_num_splits(
            num_tokens, num_heads, head_dim, block_q, num_head_groups,
            metadata.block_tables.shape[1] * block_size, _num_sms(query.device),
        )  # fmt: skip
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits={num_splits} must be from 1 to {MAX_SPLITS}")
    partial_out, partial_lse, counters = _split_buffers(query, num_splits, num_tiles * num_head_groups)
    kv_bytes = 2 * metadata.num_context_tokens * num_kv_heads * head_dim * key_cache.element_size()
    heads_first = kv_bytes <= _l2_bytes(query.device) and num_tiles < 1 << 16  # a grid's y limit
    grid = (num_head_groups, num_tiles) if heads_first else (num_tiles, num_head_groups)
    combine_rows = min(PREFILL_COMBINE_ROWS, config.block_m)
    _prefill_kernel[(*grid, num_splits)](
        query, key_cache, value_cache, out, partial_out, partial_lse, counters,
        metadata.block_tables, metadata.seq_lens, metadata.query_start_loc,
        scale * LOG2_E, num_seqs, num_tokens, num_tiles, num_heads,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        metadata.block_tables.stride(0),
        QUERY_HEADS_PER_KV=group_size,
        HEADS_PER_PROGRAM=heads_per_program,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_SIZE=block_size,
        BLOCK_M=config.block_m,
        BLOCK_Q=block_q,
        BLOCK_N=config.block_n,
        NUM_SPLITS=num_splits,
        COMBINE_ROWS=combine_rows,
        COMBINE_SPLITS=_combine_splits_at_once(num_splits, combine_rows, PREFILL_COMBINE_PAIRS),
        DOT_PRECISION=_dot_precision(query.dtype),
        HEADS_FIRST=heads_first,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        maxnreg=config.maxnreg,
    )  # fmt: skip
    return out


def decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    config: DecodeConfig | None = None,
) -> torch.Tensor:
    """Attention of one query per sequence (token ``s`` of sequence ``s``) over the paged KV cache.

    Shapes as for ``prefill_attention``. Rows of sequences with ``seq_len`` 0, and query rows
    past the block table's rows, are zeros. The launch depends only on tensor shapes, so the
    call can be captured in a CUDA graph: ``num_splits`` (default ``decode_num_splits``) must
    then stay fixed for the graph's shapes. ``config`` overrides ``DECODE_CONFIGS``.
    """
    num_rows, num_heads, head_dim = query.shape
    block_size, num_kv_heads = key_cache.shape[1:3]
    block_d = _check_inputs(query, key_cache, value_cache, metadata)
    out = _output(query, out)
    if num_rows == 0:
        return out
    config = config or _for_dtype(DECODE_CONFIGS[block_d], query.dtype)
    group_size = num_heads // num_kv_heads
    max_blocks_per_seq = metadata.block_tables.shape[1]
    if num_splits is None:
        num_sms = _num_sms(query.device)
        num_splits = decode_num_splits(num_rows, num_kv_heads, max_blocks_per_seq, block_size, num_sms)
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits={num_splits} must be from 1 to {MAX_SPLITS}")
    partial_out, partial_lse, counters = _split_buffers(query, num_splits, num_rows * num_kv_heads)
    combine_heads = triton.next_power_of_2(group_size)
    _decode_kernel[(num_rows, num_kv_heads, num_splits)](
        query, key_cache, value_cache, out, partial_out, partial_lse, counters,
        metadata.block_tables, metadata.seq_lens,
        scale * LOG2_E, metadata.seq_lens.shape[0], num_heads, num_kv_heads,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        metadata.block_tables.stride(0),
        QUERY_HEADS_PER_KV=group_size,
        BLOCK_H=max(16, triton.next_power_of_2(group_size)),
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_SIZE=block_size,
        BLOCK_N=config.block_n,
        NUM_SPLITS=num_splits,
        COMBINE_HEADS=combine_heads,
        COMBINE_SPLITS=decode_combine_splits(num_splits, combine_heads),
        DOT_PRECISION=_dot_precision(query.dtype),
        **launch.pdl(query.device),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )  # fmt: skip
    return out


def decode_num_splits(num_seqs: int, num_kv_heads: int, max_blocks_per_seq: int, block_size: int, num_sms: int) -> int:
    """Splits per sequence for ``decode_attention``: a power of two, from shapes only.

    About two (sequence, KV head, split) programs a multiprocessor, but at most
    ``DECODE_MAX_SPLITS``, and none shorter than ``DECODE_MIN_SPLIT_LEN`` keys when the context
    fills the block table. An H100 sweep of every power of two from 1 to 64 at batch 1-32 and
    1k-32k keys (BENCHMARKS.md) found this within 1.07x of the best count everywhere, 1.01x
    on geometric mean; four programs a multiprocessor and 256-key splits, the rule before,
    took up to 1.58x (batch 1, 1k keys: 11.5 us against 7.3).
    """
    max_context = max_blocks_per_seq * block_size
    wanted = 2 * num_sms // (num_seqs * num_kv_heads)
    most = max(1, min(DECODE_MAX_SPLITS, wanted, max_context // DECODE_MIN_SPLIT_LEN))
    return 1 << int(math.log2(most))


def default_prefill_config(num_tokens: int, block_d: int, dtype: torch.dtype) -> PrefillConfig:
    """The launch parameters of a prefill step of ``num_tokens`` (padded head dimension ``block_d``)."""
    is_few = num_tokens <= FEW_QUERY_MAX_TOKENS and block_d in FEW_QUERY_CONFIGS
    return _for_dtype((FEW_QUERY_CONFIGS if is_few else PREFILL_CONFIGS)[block_d], dtype)


def prefill_num_splits(
    num_tokens: int,
    num_heads: int,
    head_dim: int,
    block_q: int,
    num_head_groups: int,
    max_context: int,
    num_sms: int,
) -> int:
    """Context splits of each query tile for ``prefill_attention``: a power of two, from shapes only.

    A step of few tokens (a verification of drafted tokens, a short chunk) over a long context
    would otherwise leave most multiprocessors idle while a few programs each read the whole
    context. Splits aim at two programs a multiprocessor for the fewest query tiles the step
    may make: one a ``block_q`` tokens (one sequence), or for steps of at most
    ``FEW_QUERY_MAX_TOKENS`` one a ``FEW_QUERY_TOKENS_PER_SEQ`` (sequences verifying a few drafted
    tokens each). No split is shorter than ``MIN_SPLIT_LEN`` keys of a full-width context, and
    the partial outputs take at most ``MAX_PARTIAL_BYTES``. On an H200 this picked the fastest
    count measured for 5 queries of 1, 4 and 16 sequences and for chunks of 256-2048 tokens
    (BENCHMARKS.md).
    """
    tokens_per_tile = FEW_QUERY_TOKENS_PER_SEQ if num_tokens <= FEW_QUERY_MAX_TOKENS else block_q
    num_programs = triton.cdiv(num_tokens, tokens_per_tile) * num_head_groups
    wanted = max(1, 2 * num_sms // num_programs)
    partial_bytes = num_tokens * num_heads * head_dim * 4
    most = max(1, min(MAX_SPLITS, wanted, max_context // MIN_SPLIT_LEN, MAX_PARTIAL_BYTES // partial_bytes))
    return 1 << int(math.log2(most))


def _split_buffers(
    query: torch.Tensor, num_splits: int, num_counters: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Partial outputs [num_tokens, num_splits, num_heads, head_dim] and log-sum-exps
    [num_tokens, num_splits, num_heads] in fp32, and the split counters (launch.py)."""
    if num_splits == 1:
        return query, query, query  # never read: the kernels write their output directly
    num_tokens, num_heads, head_dim = query.shape
    partial_out = query.new_empty((num_tokens, num_splits, num_heads, head_dim), dtype=torch.float32)
    partial_lse = query.new_empty((num_tokens, num_splits, num_heads), dtype=torch.float32)
    return partial_out, partial_lse, launch.split_counters(query.device, num_counters)


def decode_combine_splits(num_splits: int, combine_heads: int) -> int:
    """Splits whose partials ``decode_attention``'s combine reads in one trip, for
    ``combine_heads`` query heads a KV head (padded to a power of two)."""
    pairs = COMBINE_ONE_TRIP_PAIRS if num_splits >= COMBINE_ONE_TRIP_SPLITS else COMBINE_PAIRS
    return _combine_splits_at_once(num_splits, combine_heads, pairs)


def _combine_splits_at_once(num_splits: int, rows: int, pairs: int) -> int:
    """Splits whose partials of ``rows`` rows the combine reads at once: ``pairs`` (split, row) partials."""
    return max(1, min(triton.next_power_of_2(num_splits), pairs // rows))


def _heads_per_program(group_size: int, block_m: int) -> int:
    """The most query heads of one KV head (a divisor of the group) that leave a tile
    ``MIN_TOKENS_PER_TILE`` tokens."""
    most = max(1, block_m // MIN_TOKENS_PER_TILE)
    return max(d for d in range(1, min(group_size, most) + 1) if group_size % d == 0)


def _check_inputs(
    query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, metadata: AttentionMetadata
) -> int:
    """Raise ValueError on inputs the kernels do not take; returns the padded head dimension."""
    num_heads, head_dim = query.shape[1:]
    num_kv_heads = key_cache.shape[2]
    if head_dim > MAX_HEAD_DIM or key_cache.shape[3] != head_dim:
        raise ValueError(
            f"head_dim={head_dim} (KV cache head_dim={key_cache.shape[3]}) is not supported: "
            f"query and cache must agree and be at most {MAX_HEAD_DIM}"
        )
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    if key_cache.shape != value_cache.shape or key_cache.stride() != value_cache.stride():
        raise ValueError(f"key_cache {tuple(key_cache.shape)} and value_cache {tuple(value_cache.shape)} differ")
    if not query.dtype == key_cache.dtype == value_cache.dtype:
        raise ValueError(f"query dtype {query.dtype} differs from the KV cache dtype {key_cache.dtype}")
    if query.stride(2) != 1 or key_cache.stride(3) != 1:
        raise ValueError("query and KV cache need a contiguous last (head_dim) dimension")
    if metadata.block_tables.dtype != torch.int32 or metadata.block_tables.stride(1) != 1:
        raise ValueError("block_tables must be int32 with contiguous rows")
    return max(16, triton.next_power_of_2(head_dim))


def _output(query: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty_like(query)
    if out.shape != query.shape or out.dtype != query.dtype or out.stride(2) != 1:
        raise ValueError(f"out {tuple(out.shape)} {out.dtype} does not match query {tuple(query.shape)} {query.dtype}")
    return out


def _for_dtype(config: PrefillConfig | DecodeConfig, dtype: torch.dtype) -> PrefillConfig | DecodeConfig:
    """A 16-bit config's tiles halved for 32-bit inputs, so they take the same shared memory."""
    if dtype.itemsize < 4:
        return config
    changes = {"block_n": max(16, config.block_n // 2), "num_stages": min(2, config.num_stages)}
    if isinstance(config, PrefillConfig):
        changes["block_m"] = max(16, config.block_m // 2)
    return dataclasses.replace(config, **changes)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get full-precision products (TF32 would lose ~3 digits); 16-bit ones ignore it.
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.cache
def _l2_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 50 << 20  # an H100's, for Triton's interpreter
    return torch.cuda.get_device_properties(device).L2_cache_size


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # Triton's interpreter on the CPU: a few programs per call are plenty
    return torch.cuda.get_device_properties(device).multi_processor_count

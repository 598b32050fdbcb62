"""Paged attention of a decode step (one query token a sequence) as one NKI kernel.

The neuron backend's XLA form gathers every token's context into HBM, a chunk at a time,
and reads it back for the two matmuls. Here each sequence walks its context in tiles of 128
keys, one key a partition: the tile's cache rows (every KV head of a key: one row of the
pool, one DMA descriptor) are gathered by an indirect DMA straight into SBUF, and each KV
head folds the tile into its online softmax (running max, sum and output in fp32)::

    for each sequence s:
        for each tile of 128 key positions:
            K, V = rows slots[s, tile] of the pools                  [128, kv_heads * head_dim]
            for each KV head h (its `group` query heads):
                scores = q_t[:, h's heads].T @ K_h.T * scale + bias  [group, 128]  (TensorE, PSUM)
                max, sum, out_h rescaled by exp(old max - new max)
                out_h += exp(scores - max) @ V_h                     [group, head_dim]
        result[s] = out / sum

The wrapper lays out what the kernel indexes: each key position's cache row (``slots``),
an additive mask (``bias``: 0 up to the sequence's length, ``MASKED`` after) and the
queries transposed. Every tile is computed, as in the XLA form: NKI's first API
has no loop whose trip count is read at run time, so the block table's width (the context
bucket) bounds the work, not the sequence's length.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

try:  # the Neuron SDK; absent, the kernel stays a plain function that is never called
    import neuronxcc.nki.language as nl
    from neuronxcc import nki
except Exception:  # the PyPI placeholders raise more than ImportError
    nki = nl = None

_jit = nki.jit if nki is not None else (lambda kernel: kernel)

TILE = 128
"""Key positions a step of the walk: one a partition."""

MASKED = -30000.0
"""The bias of a position past the sequence's end, and the running max's start. Finite, so
that no arithmetic meets an infinity; exp(MASKED - max) is 0 once the max is a real score,
which it is from the first tile on, since position 0 is always visible."""


def takes(query: torch.Tensor, key_cache: torch.Tensor, block_tables: torch.Tensor) -> bool:
    """Whether the kernel computes this decode step: a query token a sequence, heads that fit
    a tile's partitions."""
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[2]
    return num_tokens == block_tables.shape[0] and head_dim <= TILE and num_heads // num_kv_heads <= TILE


def kernel_inputs(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel's inputs, made from a decode step's tensors with static-shape torch ops.

    Returns ``(query_t, key_rows, value_rows, slots, bias)``:

    - ``query_t`` [num_seqs, head_dim, num_heads]: the queries transposed (the first matmul
      contracts ``head_dim`` over partitions); a KV head's group of heads are consecutive;
    - ``key_rows``, ``value_rows`` [num_blocks * block_size, num_kv_heads * head_dim]: the
      pools as one row a slot (views);
    - ``slots`` [num_seqs, width] int32: the row of each key position, ``width`` the block
      table's keys rounded up to ``TILE`` (the rounding reads row 0, masked);
    - ``bias`` [num_seqs, group, width] fp32: 0 where a position is below the sequence's
      length, ``MASKED`` elsewhere, once per query head of a group (a tile's scores hold the
      group's heads on partitions).
    """
    num_seqs, num_heads, head_dim = query.shape
    num_blocks, block_size, num_kv_heads, _ = key_cache.shape
    group = num_heads // num_kv_heads
    context = block_tables.shape[1] * block_size
    width = -(-context // TILE) * TILE
    device = query.device
    query_t = query.transpose(1, 2).contiguous()
    offsets = torch.arange(block_size, device=device)
    slots = (block_tables.long()[:, :, None] * block_size + offsets).reshape(num_seqs, context)
    slots = F.pad(slots, (0, width - context)).int()
    visible = torch.arange(width, device=device)[None, :] < seq_lens.long()[:, None]
    # Tensors, not Python floats: those would enter an XLA graph as f64 parameters.
    zero = torch.zeros((), dtype=torch.float32, device=device)
    masked = torch.full((), MASKED, dtype=torch.float32, device=device)
    bias = torch.where(visible, zero, masked)[:, None, :].expand(num_seqs, group, width).contiguous()
    rows = num_blocks * block_size
    key_rows = key_cache.view(rows, num_kv_heads * head_dim)
    value_rows = value_cache.view(rows, num_kv_heads * head_dim)
    return query_t, key_rows, value_rows, slots, bias


def paged_decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """[num_seqs, num_heads, head_dim]: decode attention by the NKI kernel, on Neuron tensors.

    A padded sequence (length 0) sees only masked positions: its row is finite and
    meaningless, and the caller zeroes it, as it does every padding token's.
    """
    if nki is None:
        raise RuntimeError("the NKI decode attention needs the Neuron SDK's neuronxcc.nki")
    query_t, key_rows, value_rows, slots, bias = kernel_inputs(query, key_cache, value_cache, block_tables, seq_lens)
    return decode_attention_kernel(query_t, key_rows, value_rows, slots, bias, scale=float(scale))


def decode_attention_tiles(
    query_t: np.ndarray,
    key_rows: np.ndarray,
    value_rows: np.ndarray,
    slots: np.ndarray,
    bias: np.ndarray,
    scale: float,
) -> np.ndarray:
    """The kernel's tiles in NumPy: same inputs, same walk, same fp32 arithmetic.

    Probabilities meet the values in the values' dtype, as the kernel's second matmul takes
    them (NumPy has no bfloat16: check 16-bit runs in float16).
    """
    num_seqs, head_dim, num_heads = query_t.shape
    num_kv_heads = key_rows.shape[1] // head_dim
    group = num_heads // num_kv_heads
    out = np.empty((num_seqs, num_heads, head_dim), dtype=query_t.dtype)
    for seq in range(num_seqs):
        q_t = query_t[seq].astype(np.float32)  # [head_dim, num_heads]
        running_max = np.full((group, num_kv_heads), MASKED, dtype=np.float32)
        running_sum = np.zeros((group, num_kv_heads), dtype=np.float32)
        acc = np.zeros((group, num_kv_heads * head_dim), dtype=np.float32)
        for start in range(0, slots.shape[1], TILE):
            rows = slots[seq, start : start + TILE]
            keys, values = key_rows[rows], value_rows[rows]  # [TILE, num_kv_heads * head_dim]
            tile_bias = bias[seq, :, start : start + TILE]
            for kv in range(num_kv_heads):
                heads, dims = slice(kv * group, (kv + 1) * group), slice(kv * head_dim, (kv + 1) * head_dim)
                scores = q_t[:, heads].T @ keys[:, dims].astype(np.float32).T * np.float32(scale) + tile_bias
                old_max = running_max[:, kv : kv + 1]
                new_max = np.maximum(old_max, scores.max(axis=1, keepdims=True))
                probs = np.exp(scores - new_max)
                rescale = np.exp(old_max - new_max)
                pv = probs.astype(values.dtype).astype(np.float32) @ values[:, dims].astype(np.float32)
                running_sum[:, kv : kv + 1] = running_sum[:, kv : kv + 1] * rescale + probs.sum(axis=1, keepdims=True)
                acc[:, dims] = acc[:, dims] * rescale + pv
                running_max[:, kv : kv + 1] = new_max
        for kv in range(num_kv_heads):
            dims = slice(kv * head_dim, (kv + 1) * head_dim)
            out[seq, kv * group : (kv + 1) * group] = (acc[:, dims] / running_sum[:, kv : kv + 1]).astype(out.dtype)
    return out


@_jit
def decode_attention_kernel(query_t, key_rows, value_rows, slots, bias, scale=1.0):
    """See the module's docstring; shapes as ``kernel_inputs`` returns them."""
    num_seqs, head_dim, num_heads = query_t.shape
    num_kv_heads = key_rows.shape[1] // head_dim
    group = num_heads // num_kv_heads
    num_tiles = slots.shape[1] // TILE
    out = nl.ndarray((num_seqs, num_heads, head_dim), dtype=query_t.dtype, buffer=nl.shared_hbm)
    i_key = nl.arange(TILE)[:, None]
    i_tile = nl.arange(TILE)[None, :]
    i_dim = nl.arange(head_dim)[None, :]
    i_dim_p = nl.arange(head_dim)[:, None]
    i_group = nl.arange(group)[None, :]
    i_group_p = nl.arange(group)[:, None]
    i_row = nl.arange(num_kv_heads * head_dim)[None, :]
    for seq in nl.affine_range(num_seqs):
        q_t = nl.load(query_t[seq, i_dim_p, nl.arange(num_heads)[None, :]])  # [head_dim, num_heads]
        # Every tile's cache rows at once, a tile a column: [TILE, num_tiles].
        slot_columns = nl.load(slots[seq, nl.arange(num_tiles)[None, :] * TILE + i_key])
        running_max = nl.full((group, num_kv_heads), MASKED, dtype=nl.float32)
        running_sum = nl.zeros((group, num_kv_heads), dtype=nl.float32)
        acc = nl.zeros((group, num_kv_heads * head_dim), dtype=nl.float32)
        for tile in nl.sequential_range(num_tiles):
            # A key a partition, all its KV heads: one DMA descriptor of a row each.
            keys = nl.load(key_rows[slot_columns[i_key, tile], i_row])  # [TILE, num_kv_heads * head_dim]
            values = nl.load(value_rows[slot_columns[i_key, tile], i_row])
            tile_bias = nl.load(bias[seq, i_group_p, tile * TILE + i_tile])  # [group, TILE]
            for kv in nl.affine_range(num_kv_heads):
                key_t = nl.copy(nl.transpose(keys[i_key, kv * head_dim + i_dim]), dtype=keys.dtype)  # [head_dim, TILE]
                scores = nl.matmul(q_t[i_dim_p, kv * group + i_group], key_t, transpose_x=True)  # [group, TILE] fp32
                scores = nl.add(nl.multiply(scores, scale), tile_bias)
                old_max = running_max[i_group_p, kv]
                new_max = nl.maximum(old_max, nl.max(scores, axis=1, keepdims=True))
                probs = nl.exp(nl.subtract(scores, new_max))
                rescale = nl.exp(nl.subtract(old_max, new_max))
                probs_t = nl.copy(nl.transpose(nl.copy(probs, dtype=values.dtype)), dtype=values.dtype)  # [TILE, group]
                pv = nl.matmul(probs_t, values[i_key, kv * head_dim + i_dim], transpose_x=True)  # [group, head_dim]
                running_sum[i_group_p, kv] = nl.add(
                    nl.multiply(running_sum[i_group_p, kv], rescale), nl.sum(probs, axis=1, keepdims=True)
                )
                head_acc = acc[i_group_p, kv * head_dim + i_dim]
                acc[i_group_p, kv * head_dim + i_dim] = nl.add(nl.multiply(head_acc, rescale), pv)
                running_max[i_group_p, kv] = new_max
        for kv in nl.affine_range(num_kv_heads):
            result = nl.divide(acc[i_group_p, kv * head_dim + i_dim], running_sum[i_group_p, kv], dtype=out.dtype)
            nl.store(out[seq, kv * group + i_group_p, i_dim], value=result)
    return out

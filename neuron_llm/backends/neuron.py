"""The Neuron backend: static-shape forms of the ops that trace into one XLA graph per bucket.

torch-neuronx runs PyTorch through torch-xla: every op on a lazy tensor is recorded, and a
graph is compiled (by neuronx-cc to a NEFF) the first time its shape signature is seen and
reused after. So nothing here reads a tensor on the host or lets a value decide a shape:
sizes come only from the bucket (num_tokens, num_seqs, max_blocks_per_seq) and the pool.
The same code runs eagerly on CPU tensors, which is how it is checked against ``torch``.

Attention gathers, for every token of the flat batch, the whole block-table row of its
sequence and masks what lies beyond the token's position::

    token t of sequence s:  keys 0 .. position(t) of s   (the rest of the row masked)
    position(t) = seq_lens[s] - query_len[s] + (t - query_start_loc[s])

The gathered keys and values are [num_tokens, max_blocks_per_seq * block_size, num_kv_heads,
head_dim]: the simplest static form, no larger than the context itself for decode buckets (one
token per sequence) but growing as num_tokens x the longest context for prefill buckets. With
the engine's defaults (2,048-token prefill buckets, 8,192-token contexts) an 8B model's K alone
would take 32 GiB per layer there, so serve Neuron with small ``max_num_batched_tokens`` and
``max_model_len``. A form that walks the context in chunks (an online softmax, or an NKI
flash-attention kernel) is not built: ``nki_kernels/`` ships none yet.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from neuron_llm.backends.base import Backend

if TYPE_CHECKING:
    from neuron_llm.ops.metadata import AttentionMetadata


class NeuronBackend(Backend):
    """Gather-based paged attention and scatter KV writes with static shapes (torch-xla friendly)."""

    name = "neuron"

    def write_kv_cache(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        # A 2-D index into the pool itself rather than index_copy_ on a flattened view: torch-xla
        # refuses in-place writes through a view under inference_mode, and both lower to the
        # same scatter. Padding tokens all write slot 0 of the null block; which one wins is moot.
        block_size = key_cache.shape[1]
        block_ids = slot_mapping // block_size
        offsets = slot_mapping % block_size
        key_cache.index_put_((block_ids, offsets), key.to(key_cache.dtype))
        value_cache.index_put_((block_ids, offsets), value.to(value_cache.dtype))

    def paged_attention(
        self,
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        num_tokens, num_heads, head_dim = query.shape
        num_kv_heads = key_cache.shape[2]
        seq_ids, positions, is_real = token_layout(metadata, num_tokens)
        block_table = metadata.block_tables.index_select(0, seq_ids)  # [num_tokens, max_blocks_per_seq]
        key = gather_context(key_cache, block_table)  # [num_tokens, context, num_kv_heads, head_dim]
        value = gather_context(value_cache, block_table)
        mask = context_mask(positions, key.shape[1])  # [num_tokens, context]
        # GQA: query heads h = kv * group + g share KV head kv.
        # grouped_query: [num_tokens, num_kv_heads, group, head_dim]
        grouped_query = query.view(num_tokens, num_kv_heads, num_heads // num_kv_heads, head_dim)
        scores = torch.einsum("tkgd,tckd->tkgc", grouped_query, key).float() * scale
        # A fp32 fill value: a Python float would enter the graph as an f64 parameter.
        masked = torch.full((), float("-inf"), dtype=scores.dtype, device=scores.device)
        scores = torch.where(mask[:, None, None, :], scores, masked)
        probs = torch.softmax(scores, dim=-1).to(value.dtype)
        out = torch.einsum("tkgc,tckd->tkgd", probs, value).reshape(num_tokens, num_heads, head_dim)
        return out * is_real[:, None, None].to(out.dtype)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)


def token_layout(metadata: AttentionMetadata, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token sequence index, position in its sequence and realness, from device tensors only.

    Returns ``seq_ids`` [num_tokens] int64, ``positions`` [num_tokens] int64 and ``is_real``
    [num_tokens] bool. Padding tokens (past the last real sequence's end) get a valid
    sequence index (the last row), position 0 and ``is_real`` False.
    """
    starts = metadata.query_start_loc.long()  # [num_seqs + 1]
    num_seqs = starts.shape[0] - 1
    token_ids = torch.arange(num_tokens, device=starts.device)
    # Sequence of token t = how many sequences end at or before t (ends are non-decreasing).
    seq_ids = (starts[None, 1:] <= token_ids[:, None]).sum(dim=1)
    is_real = seq_ids < num_seqs
    seq_ids = seq_ids.clamp(max=num_seqs - 1)
    seq_lens = metadata.seq_lens.long()
    # The step's tokens are the last of their context, so token t sits (end - t) before seq_len.
    positions = seq_lens.index_select(0, seq_ids) - starts[1:].index_select(0, seq_ids) + token_ids
    return seq_ids, torch.where(is_real, positions, torch.zeros_like(positions)), is_real


def gather_context(cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """Gather each token's context: cache [num_blocks, block_size, kv_heads, head_dim] by
    block_table [num_tokens, max_blocks] -> [num_tokens, max_blocks * block_size, kv_heads, head_dim]."""
    num_tokens, max_blocks = block_table.shape
    block_size, num_kv_heads, head_dim = cache.shape[1:]
    blocks = cache.index_select(0, block_table.reshape(-1).long())
    return blocks.view(num_tokens, max_blocks * block_size, num_kv_heads, head_dim)


def context_mask(positions: torch.Tensor, context_len: int) -> torch.Tensor:
    """[num_tokens, context_len] bool: key slot j is visible to token t when j <= position(t).

    A padding token (position 0) sees slot 0 only, so no softmax row is all masked.
    """
    slots = torch.arange(context_len, device=positions.device)
    return slots[None, :] <= positions[:, None]

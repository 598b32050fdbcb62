"""The reference backend: plain PyTorch on CPU or CUDA, the ground truth in tests."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from neuron_llm.backends.base import Backend

if TYPE_CHECKING:
    from neuron_llm.ops.metadata import AttentionMetadata


class TorchBackend(Backend):
    name = "torch"

    def write_kv_cache(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        num_kv_heads, head_dim = key_cache.shape[-2:]
        key_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key.to(key_cache.dtype))
        value_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value.to(value_cache.dtype))

    def paged_attention(
        self,
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        if metadata.is_decode:
            return _decode_attention(query, key_cache, value_cache, metadata, scale)
        # One SDPA call per sequence: the clearest correct form, looping on the host.
        output = torch.zeros_like(query)
        block_size, num_kv_heads, head_dim = key_cache.shape[1:]
        is_grouped = query.shape[1] != num_kv_heads
        starts = metadata.query_start_loc_host
        for seq, seq_len in enumerate(metadata.seq_lens_host):
            start, end = starts[seq], starts[seq + 1]
            query_len = end - start
            if query_len == 0:
                continue
            blocks = metadata.block_tables[seq, : -(-seq_len // block_size)]
            # key, value: [num_kv_heads, seq_len, head_dim]
            key = key_cache[blocks].flatten(0, 1)[:seq_len].transpose(0, 1)
            value = value_cache[blocks].flatten(0, 1)[:seq_len].transpose(0, 1)
            out = F.scaled_dot_product_attention(
                query[start:end].transpose(0, 1),
                key,
                value,
                attn_mask=_causal_mask(query_len, seq_len, query.device),
                is_causal=1 < query_len == seq_len,
                scale=scale,
                enable_gqa=is_grouped,
            )  # [num_heads, query_len, head_dim]
            output[start:end] = out.transpose(0, 1)
        return output

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)


def _causal_mask(query_len: int, seq_len: int, device: torch.device) -> torch.Tensor | None:
    """Mask [query_len, seq_len] of the keys each query sees; None when SDPA needs none.

    Query ``i`` sits at position ``seq_len - query_len + i``. A single query sees every key,
    and queries spanning the whole context are plainly causal (``is_causal``).
    """
    if query_len == 1 or query_len == seq_len:
        return None
    query_positions = torch.arange(seq_len - query_len, seq_len, device=device)
    return torch.arange(seq_len, device=device)[None, :] <= query_positions[:, None]


def _decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """One query per sequence: a single batched SDPA over each sequence's gathered blocks."""
    block_size, num_kv_heads, head_dim = key_cache.shape[1:]
    num_seqs = metadata.query_start_loc_host[-1]  # the real ones; padding tokens come after
    output = torch.zeros_like(query)
    if num_seqs == 0:
        return output
    max_len = max(metadata.seq_lens_host[:num_seqs])
    blocks = metadata.block_tables[:num_seqs, : -(-max_len // block_size)]
    # key, value: [num_seqs, num_kv_heads, max_len, head_dim]; positions past a sequence's
    # length (other blocks of its table, or the null block) are masked out.
    key = key_cache[blocks].flatten(1, 2)[:, :max_len].transpose(1, 2)
    value = value_cache[blocks].flatten(1, 2)[:, :max_len].transpose(1, 2)
    mask = torch.arange(max_len, device=query.device) < metadata.seq_lens[:num_seqs, None, None, None]
    out = F.scaled_dot_product_attention(
        query[:num_seqs, :, None, :], key, value, attn_mask=mask, scale=scale, enable_gqa=query.shape[1] != num_kv_heads
    )  # [num_seqs, num_heads, 1, head_dim]
    output[:num_seqs] = out[:, :, 0, :]
    return output

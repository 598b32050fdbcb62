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
        # One SDPA call per sequence: the clearest correct form, looping on the host.
        output = torch.zeros_like(query)
        num_heads = query.shape[1]
        block_size, num_kv_heads, head_dim = key_cache.shape[1:]
        group = num_heads // num_kv_heads
        starts = metadata.query_start_loc_host
        for seq, seq_len in enumerate(metadata.seq_lens_host):
            start, end = starts[seq], starts[seq + 1]
            if end == start:
                continue
            num_blocks = -(-seq_len // block_size)
            blocks = metadata.block_tables[seq, :num_blocks].long()
            # key, value: [num_heads, seq_len, head_dim]
            key = key_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len]
            value = value_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len]
            key = key.repeat_interleave(group, dim=1).transpose(0, 1)
            value = value.repeat_interleave(group, dim=1).transpose(0, 1)
            # Query i of this step sits at position seq_len - query_len + i.
            query_len = end - start
            query_positions = torch.arange(seq_len - query_len, seq_len, device=query.device)
            mask = torch.arange(seq_len, device=query.device)[None, :] <= query_positions[:, None]
            out = F.scaled_dot_product_attention(
                query[start:end].transpose(0, 1), key, value, attn_mask=mask, scale=scale
            )  # [num_heads, query_len, head_dim]
            output[start:end] = out.transpose(0, 1)
        return output

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)

"""The Neuron backend: static-shape forms of the ops that trace into one XLA graph per bucket.

torch-neuronx runs PyTorch through torch-xla: every op on a lazy tensor is recorded, and a
graph is compiled (by neuronx-cc to a NEFF) the first time its shape signature is seen and
reused after. So nothing here reads a tensor on the host or lets a value decide a shape:
sizes come only from the bucket (num_tokens, num_seqs, max_blocks_per_seq) and the pool.
The same code runs eagerly on CPU tensors, which is how it is checked against ``torch``.

Attention gathers, for every token of the flat batch, its sequence's block-table row and
masks what lies beyond the token's position::

    token t of sequence s:  keys 0 .. position(t) of s   (the rest of the row masked)
    position(t) = seq_lens[s] - query_len[s] + (t - query_start_loc[s])

It walks the row in chunks of about ``CHUNK_KEYS`` keys with an online softmax (running max,
sum and output in fp32), so what a graph holds at once is [num_tokens, chunk, num_kv_heads,
head_dim] rather than the whole context per token: gathered at once, an 8B model's keys
alone took 32 GiB a layer for a 2,048-token prefill bucket over 8,192-token contexts.
The chunks are unrolled at trace time, so the graph grows with the block-table width; no
chunk is skipped, since which are empty is a value, not a shape. The runner bounds the
width instead: it cuts a step's tables to the narrowest context bucket holding its longest
sequence (``neuron_llm.buckets``).

Where the Neuron SDK is installed, ``nki_kernels`` swaps in NKI kernels (``nki_kernels/``):
decode steps' attention, and the int8 weight-only matmul of per-channel weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from neuron_llm.backends.base import Backend
from neuron_llm.quant import reference
from neuron_llm.quant.formats import dequantize_int8

if TYPE_CHECKING:
    from neuron_llm.ops.metadata import AttentionMetadata


CHUNK_KEYS = 512
"""Keys per step of attention's walk over a block-table row (whole blocks, at least one)."""


class NeuronBackend(Backend):
    """Gather-based paged attention and scatter KV writes with static shapes (torch-xla friendly)."""

    name = "neuron"

    def __init__(self, nki_kernels: Sequence[str] | None = ()) -> None:
        from nki_kernels import check

        self.nki_kernels = frozenset(check(nki_kernels))
        """The NKI kernels (of ``nki_kernels.KERNELS``) that replace their XLA forms."""

    def prepare_model(self, model: nn.Module) -> None:
        if "int8_matmul" in self.nki_kernels:
            from nki_kernels.int8_matmul import replace_int8_linears

            replace_int8_linears(model)

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
        if "decode_attention" in self.nki_kernels and metadata.is_decode:
            from nki_kernels import decode_attention

            if decode_attention.takes(query, key_cache, metadata.block_tables):
                out = decode_attention.paged_decode_attention(
                    query, key_cache, value_cache, metadata.block_tables, metadata.seq_lens, scale
                )
                # Token s is sequence s's; a padded one has an empty context and a meaningless row.
                return out * (metadata.seq_lens > 0)[:, None, None].to(out.dtype)
        num_tokens, num_heads, head_dim = query.shape
        num_kv_heads = key_cache.shape[2]
        block_size = key_cache.shape[1]
        seq_ids, positions, is_real = token_layout(metadata, num_tokens)
        block_table = metadata.block_tables.index_select(0, seq_ids)  # [num_tokens, max_blocks_per_seq]
        # GQA: query heads h = kv * group + g share KV head kv.
        # grouped_query: [num_tokens, num_kv_heads, group, head_dim]
        grouped_query = query.view(num_tokens, num_kv_heads, num_heads // num_kv_heads, head_dim)
        # A fp32 fill value: a Python float would enter the graph as an f64 parameter.
        masked = torch.full((), float("-inf"), dtype=torch.float32, device=query.device)
        chunk_blocks = max(1, CHUNK_KEYS // block_size)
        running_max = running_sum = out = None
        for first in range(0, block_table.shape[1], chunk_blocks):
            chunk_table = block_table[:, first : first + chunk_blocks]
            key = gather_context(key_cache, chunk_table)  # [num_tokens, chunk, num_kv_heads, head_dim]
            value = gather_context(value_cache, chunk_table)
            mask = context_mask(positions - first * block_size, key.shape[1])  # [num_tokens, chunk]
            scores = torch.einsum("tkgd,tckd->tkgc", grouped_query, key).float() * scale
            scores = torch.where(mask[:, None, None, :], scores, masked)
            chunk_max = scores.amax(dim=-1)
            # The first chunk holds slot 0, which every token sees: the running max is finite from it on.
            new_max = chunk_max if running_max is None else torch.maximum(running_max, chunk_max)
            probs = torch.exp(scores - new_max[..., None])
            chunk_out = torch.einsum("tkgc,tckd->tkgd", probs.to(value.dtype), value).float()
            if running_max is None:
                running_sum, out = probs.sum(dim=-1), chunk_out
            else:
                rescale = torch.exp(running_max - new_max)
                running_sum = running_sum * rescale + probs.sum(dim=-1)
                out = out * rescale[..., None] + chunk_out
            running_max = new_max
        out = (out / running_sum[..., None]).to(query.dtype).reshape(num_tokens, num_heads, head_dim)
        return out * is_real[:, None, None].to(out.dtype)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)

    def int8_linear(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None,
        group_size: int | None,
    ) -> torch.Tensor:
        # One dequantize-then-matmul for the compiler to fuse. The reference's tiles of rows,
        # which bound host memory when eager, end in a concatenation across which XLA's
        # partitioner gathers a tensor-parallel linear's output onto every device.
        return F.linear(x, dequantize_int8(weight, weight_scale, x.dtype, group_size), bias)

    def fp8_linear(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None,
        activation_scale_ub: float | None,
    ) -> torch.Tensor:
        # In one tile, as int8_linear is, for the same reason.
        return reference.fp8_linear(x, weight, weight_scale, bias, activation_scale_ub, tile_elements=weight.numel())

    def w8a8_linear(
        self, x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        return reference.w8a8_linear(x, weight, weight_scale, bias, tile_elements=weight.numel())


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

    A padding token (position 0) sees slot 0 only, so no token's first chunk is all masked.
    """
    slots = torch.arange(context_len, device=positions.device)
    return slots[None, :] <= positions[:, None]

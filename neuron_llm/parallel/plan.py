"""The sharding plan: which layer of the single-device Llama becomes which parallel layer.

Applied to a freshly built ``LlamaForCausalLM``, before its weights are read, so that each
rank allocates and reads only its shards::

    embed_tokens          -> VocabParallelEmbedding   (vocabulary rows; all-reduce)
    q_proj, k_proj, v_proj -> ColumnParallelLinear     (heads; no communication)
    o_proj                -> RowParallelLinear        (heads; all-reduce)
    gate_proj, up_proj    -> ColumnParallelLinear     (intermediate features)
    down_proj             -> RowParallelLinear        (intermediate features; all-reduce)
    lm_head               -> ParallelLMHead           (vocabulary rows; all-gather)

Attention reads its head counts from the projections' widths, so the model's own forward
runs unchanged on the shards. A linear that ``prepare_quantized_model`` already made
quantized becomes the quantized shard of the same split (``neuron_llm.parallel.quantized``).
"""

from __future__ import annotations

import torch
from torch import nn

from neuron_llm.config import ModelConfig, ParallelConfig
from neuron_llm.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP
from neuron_llm.parallel import quantized
from neuron_llm.parallel.layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    Partition,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from neuron_llm.quant.layers import QuantizedLinear


def kv_head_partition(rank: int, world_size: int, num_kv_heads: int) -> Partition:
    """The KV heads rank ``rank`` of ``world_size`` holds.

    With at least as many KV heads as ranks, each rank holds ``num_kv_heads / world_size``
    of them. With fewer, each KV head is replicated on ``world_size / num_kv_heads`` ranks:
    rank ``r`` holds KV head ``r * num_kv_heads // world_size``. That is the head its query
    heads read in the unsharded grouped-query mapping (query head ``h`` reads KV head
    ``h // (num_heads / num_kv_heads)``): rank ``r``'s ``num_heads / world_size`` query
    heads start at ``r * num_heads / world_size``, and since a group of
    ``num_heads / num_kv_heads`` query heads is a whole number of ranks' worth, they all
    fall in group ``r * num_kv_heads // world_size``.
    """
    if world_size <= num_kv_heads:
        return Partition(rank, world_size)
    return Partition(rank * num_kv_heads // world_size, num_kv_heads)


def shard_model(model: LlamaForCausalLM, rank: int, world_size: int) -> LlamaForCausalLM:
    """Swap ``model``'s linears and embeddings for rank ``rank``'s parallel layers, in place.

    Call it on a model whose weights are not loaded yet (then ``load_weights`` reads only
    this rank's slices). Raises ``ValueError`` when the model's shape cannot be split
    ``world_size`` ways or ``rank`` is out of range. At ``world_size == 1`` the model is
    returned unchanged. Returns ``model``.
    """
    config = model.config
    ParallelConfig(tensor_parallel_size=world_size).check_model(config)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, tensor_parallel_size={world_size})")
    if world_size == 1:
        return model
    if isinstance(model.lm_head, QuantizedLinear):
        raise ValueError("the checkpoint quantizes lm_head, which is not sharded in 8 bits: use one device")
    partition = Partition(rank, world_size)
    for layer in model.model.layers:
        _shard_attention(layer.self_attn, config, partition)
        _shard_mlp(layer.mlp, config, partition)
    model.model.embed_tokens = _like(
        model.model.embed_tokens,
        VocabParallelEmbedding(config.vocab_size, config.hidden_size, partition),
    )
    lm_head = ParallelLMHead(config.hidden_size, config.vocab_size, partition)
    if config.tie_word_embeddings:
        # Same partition, same padded rows: the head reuses the embedding's shard.
        lm_head.weight = model.model.embed_tokens.weight
    model.lm_head = _like(model.lm_head, lm_head)
    return model


def _shard_attention(attention: LlamaAttention, config: ModelConfig, partition: Partition) -> None:
    hidden = config.hidden_size
    q_width = config.num_attention_heads * config.head_dim
    kv_width = config.num_key_value_heads * config.head_dim
    kv_partition = kv_head_partition(partition.index, partition.count, config.num_key_value_heads)
    attention.q_proj = _column(attention.q_proj, hidden, q_width, partition)
    attention.k_proj = _column(attention.k_proj, hidden, kv_width, kv_partition)
    attention.v_proj = _column(attention.v_proj, hidden, kv_width, kv_partition)
    attention.o_proj = _row(attention.o_proj, q_width, hidden, partition)


def _shard_mlp(mlp: LlamaMLP, config: ModelConfig, partition: Partition) -> None:
    hidden, intermediate = config.hidden_size, config.intermediate_size
    mlp.gate_proj = _column(mlp.gate_proj, hidden, intermediate, partition)
    mlp.up_proj = _column(mlp.up_proj, hidden, intermediate, partition)
    mlp.down_proj = _row(mlp.down_proj, intermediate, hidden, partition)


def _column(old: nn.Module, in_features: int, out_features: int, partition: Partition) -> nn.Module:
    if isinstance(old, QuantizedLinear):
        with torch.device(old.weight.device):
            return quantized.column_parallel(old.format, in_features, out_features, partition)
    return _like(old, ColumnParallelLinear(in_features, out_features, partition))


def _row(old: nn.Module, in_features: int, out_features: int, partition: Partition) -> nn.Module:
    if isinstance(old, QuantizedLinear):
        with torch.device(old.weight.device):
            return quantized.row_parallel(old.format, in_features, out_features, partition)
    return _like(old, RowParallelLinear(in_features, out_features, partition))


def _like(old: nn.Module, new: nn.Module) -> nn.Module:
    """``new`` on the device and in the dtype of the module it replaces."""
    weight = old.weight
    return new.to(device=weight.device, dtype=weight.dtype)

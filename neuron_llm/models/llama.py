"""Llama (Touvron et al. 2023; Llama 3, Dubey et al. 2024) for flat token batches.

Written for one device and static shapes: no host reads and no data-dependent shapes in
``forward``, so the same code traces into one XLA graph per bucket. Tensor parallelism,
quantization and kernels are applied around this file: a sharding plan swaps the linears
and embeddings, a backend owns attention and the KV-cache write.

Module names match Hugging Face checkpoints (``model.layers.0.self_attn.q_proj.weight``...),
so weights load by name.
"""

from __future__ import annotations

import torch
from torch import nn

from neuron_llm import ops
from neuron_llm.config import ModelConfig
from neuron_llm.layers.linear import Linear
from neuron_llm.layers.norm import RMSNorm
from neuron_llm.layers.rotary import RotaryEmbedding
from neuron_llm.ops.metadata import AttentionMetadata

KVCache = tuple[torch.Tensor, torch.Tensor]
"""(key_cache, value_cache) of one layer, each [num_blocks, block_size, num_kv_heads, head_dim]."""


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        hidden = config.hidden_size
        self.q_proj = Linear(hidden, config.num_attention_heads * config.head_dim)
        self.k_proj = Linear(hidden, config.num_key_value_heads * config.head_dim)
        self.v_proj = Linear(hidden, config.num_key_value_heads * config.head_dim)
        self.o_proj = Linear(config.num_attention_heads * config.head_dim, hidden)
        self.qkv_proj: nn.Module | None = None
        """Q, K and V as one matmul, once ``models.merge`` has merged them (the parts are then None)."""
        self.qkv_sizes: list[int] = []
        """Output features of Q, K and V in ``qkv_proj`` (this rank's, under tensor parallelism)."""

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        norm: RMSNorm,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache,
        metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention over ``norm(hidden + residual)``; returns (its output, ``hidden + residual``),
        or their sum and None (``ops.linear_residual``).

        The norm, the projection that reads it and RoPE with the cache write are applied
        together, so that a backend can fuse them (``ops.norm_qkv_rotary``).
        """
        num_tokens = hidden.shape[0]
        key_cache, value_cache = kv_cache
        # Head counts are read from the projections' widths so that a sharded layer (fewer
        # heads per rank) runs the same code. q: [num_tokens, num_heads, head_dim]
        if self.qkv_proj is None:
            hidden, residual = ops.rms_norm(hidden, norm.weight, norm.eps, residual)
            query = self.q_proj(hidden).view(num_tokens, -1, self.head_dim)
            key = self.k_proj(hidden).view(num_tokens, -1, self.head_dim)
            value = self.v_proj(hidden).view(num_tokens, -1, self.head_dim)
            query = ops.rotary_write_kv(query, key, value, cos, sin, key_cache, value_cache, metadata.slot_mapping)
        else:
            query, residual = ops.norm_qkv_rotary(
                hidden, norm.weight, norm.eps, residual, self.qkv_proj, self.qkv_sizes, self.head_dim,
                cos, sin, key_cache, value_cache, metadata.slot_mapping,
            )  # fmt: skip
        out = ops.paged_attention(query, key_cache, value_cache, metadata, self.scale)
        return ops.linear_residual(out.reshape(num_tokens, -1), self.o_proj, residual)


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size)
        self.gate_up_proj: nn.Module | None = None
        """gate and up as one matmul, once ``models.merge`` has merged them (the parts are then None)."""

    def forward(
        self, hidden: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The feed-forward of ``norm(hidden + residual)``; returns (its output, ``hidden + residual``),
        or their sum and None (``ops.feed_forward``)."""
        if self.gate_up_proj is None:
            x, residual = ops.rms_norm(hidden, norm.weight, norm.eps, residual)
            return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x)), residual
        return ops.feed_forward(hidden, norm.weight, norm.eps, residual, self.gate_up_proj, self.down_proj)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache,
        metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return (this layer's output, the residual stream before it): their sum is the new stream.

        The residual add is left to the next norm, where a backend can fuse it (``ops.rms_norm``),
        or done by the projection before it, which then returns the stream as its output and no
        residual (``ops.linear_residual``, ``ops.feed_forward``). The first layer has no residual
        yet: its stream starts as ``hidden``.
        """
        hidden, residual = self.self_attn(hidden, residual, self.input_layernorm, cos, sin, kv_cache, metadata)
        return self.mlp(hidden, residual, self.post_attention_layernorm)


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)


class LlamaForCausalLM(nn.Module):
    """The decoder and its LM head. ``forward`` returns hidden states; ``compute_logits`` the logits."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        """Run the flat batch ``input_ids`` [num_tokens] at ``positions`` [num_tokens].

        Writes each token's K/V into ``kv_caches`` (one per layer) at ``metadata.slot_mapping``
        and returns the final-norm hidden states [num_tokens, hidden_size].
        """
        hidden = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary(positions, hidden.dtype)
        residual = None
        for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
            hidden, residual = layer(hidden, residual, cos, sin, kv_cache, metadata)
        # ops, not the module: the stream may come whole (residual None), where the module returns one tensor.
        hidden, _ = ops.rms_norm(hidden, self.model.norm.weight, self.model.norm.eps, residual)
        return hidden

    def weight_bytes(self) -> int:
        """Bytes of the parameters as stored (quantized ones with their scales; a tied tensor once)."""
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def decode_read_bytes(self) -> int:
        """Bytes of the parameters a decode step of one sequence reads: ``weight_bytes``, with
        the embedding table counted as the one row it looks up, unless the LM head reads it all."""
        table = self.model.embed_tokens.weight
        if getattr(self.lm_head, "weight", None) is table:
            return self.weight_bytes()
        return self.weight_bytes() - (table.shape[0] - 1) * table[0].numel() * table.element_size()

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [num_rows, vocab_size] in fp32 for hidden states [num_rows, hidden_size], written
        into ``out`` when given."""
        logits = self.lm_head(hidden)
        return logits.float() if out is None else out.copy_(logits)

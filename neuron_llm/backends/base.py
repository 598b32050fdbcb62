"""The small interface every backend implements; model code only ever calls these."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from neuron_llm.backends import truncation
from neuron_llm.layers.rotary import apply_rotary
from neuron_llm.quant import reference

if TYPE_CHECKING:
    from neuron_llm.ops.metadata import AttentionMetadata


class Backend(abc.ABC):
    """Hardware-specific forms of the operations whose best implementation differs by device."""

    name: str

    @abc.abstractmethod
    def write_kv_cache(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        """Store ``key``/``value`` [num_tokens, num_kv_heads, head_dim] at ``slot_mapping`` in place.

        The caches are [num_blocks, block_size, num_kv_heads, head_dim].
        """

    @abc.abstractmethod
    def paged_attention(
        self,
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """Causal attention of each token over its own sequence's cached context.

        ``query`` is [num_tokens, num_heads, head_dim]; returns the same shape. Grouped-query
        attention: query head ``h`` reads KV head ``h // (num_heads // num_kv_heads)``.
        Rows of padding tokens are returned as zeros.
        """

    @abc.abstractmethod
    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ weight.T + bias`` for a 16/32-bit weight [out_features, in_features]."""

    def int8_linear(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None,
        group_size: int | None,
    ) -> torch.Tensor:
        """``x @ dequantize(weight).T + bias`` for an int8 weight-only weight (see ``quant.reference``)."""
        return reference.int8_linear(x, weight, weight_scale, bias, group_size)

    def fp8_linear(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None,
        activation_scale_ub: float | None,
    ) -> torch.Tensor:
        """The fp8 W8A8 matmul with per-token activation scales (see ``quant.reference``)."""
        return reference.fp8_linear(x, weight, weight_scale, bias, activation_scale_ub)

    def w8a8_linear(
        self, x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """The int8 W8A8 matmul with per-token activation scales (see ``quant.reference``)."""
        return reference.w8a8_linear(x, weight, weight_scale, bias)

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """The first index of each row's maximum: int64 [rows] of [rows, vocab] logits (greedy sampling)."""
        return logits.argmax(dim=-1)

    def sample_argmax(self, logits: torch.Tensor, noise: torch.Tensor, is_greedy: torch.Tensor) -> torch.Tensor:
        """The drawn token of each row of ``logits`` [rows, vocab] (int64 [rows]): for sampled rows
        ``argmax(softmax(logits) / noise)`` with ``noise`` [rows, vocab] Exp(1) draws, so each
        token wins with its probability; for rows where ``is_greedy`` (bool [rows]) the argmax."""
        sampled = (logits.softmax(dim=-1) / noise).argmax(dim=-1)
        return torch.where(is_greedy, self.argmax(logits), sampled)

    def top_k_top_p(
        self,
        logits: torch.Tensor,
        top_k: torch.Tensor | None,
        top_p: torch.Tensor | None,
        top_k_bound: int | None = None,
    ) -> torch.Tensor:
        """``logits`` [rows, vocab] with ``-inf`` where top-k (int64 [rows], ``vocab`` for none)
        or then top-p (fp32 [rows], 1 for none) drops a token: a new tensor (sampling).

        ``top_k_bound``, where given, is at least every row's top-k, except rows that keep
        every token (top-k above it, top-p 1): top-k then selects that many logits a row
        instead of sorting the vocabulary (``backends.truncation``).
        """
        bound = truncation.selection_bound(logits, top_k, top_k_bound)
        if bound is not None:
            return truncation.select_top_k_top_p(logits, top_k, top_p, bound)
        return truncation.sort_top_k_top_p(logits, top_k, top_p)

    def prepare_model(self, model: nn.Module) -> None:
        """Rewrite the loaded ``model`` in place into the form this backend runs fastest (default: as is)."""

    # Fusion points. The defaults compose the plain ops; a backend overrides them with one
    # kernel where that saves passes over memory.

    def swiglu_down(self, gate_up: torch.Tensor, down_proj: nn.Module) -> torch.Tensor:
        """``down_proj(silu(gate) * up)`` for ``gate_up`` [..., 2 * intermediate] holding gate then up."""
        gate, up = gate_up.chunk(2, dim=-1)
        return down_proj(F.silu(gate) * up)

    def feed_forward(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        residual: torch.Tensor | None,
        gate_up_proj: nn.Module,
        down_proj: nn.Module,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Llama's feed-forward of ``rms_norm(x, weight, eps, residual)`` with gate and up merged:
        ``(down_proj(silu(gate) * up), new_residual)``, by ``norm_linear`` then ``swiglu_down``.

        A backend may return the pair's sum instead, ``(output + new_residual, None)``: the next
        norm adds the residual if there is one, so either form is the same residual stream."""
        gate_up, residual = self.norm_linear(x, weight, eps, residual, gate_up_proj)
        return self.swiglu_down(gate_up, down_proj), residual

    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(norm(x + residual) * weight, x + residual)``; without ``residual``, ``(norm(x) * weight, x)``.

        Reduced in fp32 and scaled in the input dtype, as Llama's RMSNorm does.
        """
        if residual is not None:
            x = x + residual
        normed = x.float()
        normed = normed * torch.rsqrt(normed.pow(2).mean(-1, keepdim=True) + eps)
        return weight * normed.to(x.dtype), x

    def norm_linear(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None, linear: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(linear(normed), new_residual)`` for ``(normed, new_residual) = rms_norm(x, weight, eps, residual)``.

        A norm and the projection that reads it, so that a backend can do part of the
        projection's work in the norm's pass (the cuda backend quantizes fp8 activations there).
        """
        normed, residual = self.rms_norm(x, weight, eps, residual)
        return linear(normed), residual

    def linear_residual(
        self, x: torch.Tensor, linear: nn.Module, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(linear(x), residual)``: a projection whose output joins the residual stream, the
        add left to the next norm (``rms_norm``). A backend may add them itself and return
        ``(linear(x) + residual, None)``, the same stream."""
        return linear(x), residual

    def norm_qkv_rotary(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        residual: torch.Tensor | None,
        qkv_proj: nn.Module,
        qkv_sizes: Sequence[int],
        head_dim: int,
        cos: torch.Tensor,
        sin: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention's inputs from ``rms_norm(x, weight, eps, residual)``: ``norm_linear`` by the
        merged ``qkv_proj`` (Q, K and V of ``qkv_sizes`` features), then ``rotary_write_kv``.
        Returns (the rotated query [tokens, heads, head_dim], the new residual)."""
        qkv, residual = self.norm_linear(x, weight, eps, residual, qkv_proj)
        query, key, value = (part.unflatten(-1, (-1, head_dim)) for part in qkv.split(list(qkv_sizes), dim=-1))
        return self.rotary_write_kv(query, key, value, cos, sin, key_cache, value_cache, slot_mapping), residual

    def rotary_write_kv(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> torch.Tensor:
        """Rotate ``query`` and ``key`` by RoPE, store the rotated key and ``value`` in the cache;
        return the rotated query."""
        self.write_kv_cache(apply_rotary(key, cos, sin), value, key_cache, value_cache, slot_mapping)
        return apply_rotary(query, cos, sin)

"""The small interface every backend implements; model code only ever calls these."""

from __future__ import annotations

from typing import TYPE_CHECKING

import abc

import torch

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

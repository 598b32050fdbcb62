"""Megatron-style tensor-parallel layers (Shoeybi et al. 2019, https://arxiv.org/abs/1909.08053).

A column-parallel linear holds a block of output rows and needs no communication; a
row-parallel linear holds the matching block of input columns and all-reduces its partial
products. Paired as column -> row (QKV -> O, gate/up -> down) a whole block costs one
all-reduce. The vocabulary-parallel embedding and LM head hold a block of vocabulary rows.

Every sharded parameter carries a ``weight_loader(param, source)`` that reads only this
rank's rows or columns of the checkpoint tensor (see ``neuron_llm.loader.weights``).
Matmuls go through ``neuron_llm.ops.linear`` like the unsharded ``Linear``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from neuron_llm.layers.linear import Linear
from neuron_llm.parallel.state import all_gather_last_dim, all_reduce

if TYPE_CHECKING:
    # The loader package imports transformers; the layers only need the protocol's name.
    from neuron_llm.loader.weights import TensorSource


@dataclass(frozen=True)
class Partition:
    """Part ``index`` of ``count`` equal, consecutive parts of one dimension."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"partition index={self.index} must be in [0, count={self.count})")

    def bounds(self, total: int) -> tuple[int, int]:
        """``[start, end)`` of this part of ``total``, which ``count`` must divide."""
        if total % self.count:
            raise ValueError(f"cannot split {total} into {self.count} equal parts")
        size = total // self.count
        return self.index * size, (self.index + 1) * size

    def padded_bounds(self, total: int) -> tuple[int, int, int]:
        """``(start, end, padded_size)``: parts of ``ceil(total / count)``, the last ones short.

        ``end - start`` rows are real; a part holds ``padded_size`` rows so that every rank
        has the same shape (collectives need equal shapes).
        """
        padded_size = -(-total // self.count)
        start = min(self.index * padded_size, total)
        return start, min(start + padded_size, total), padded_size


def _check_shape(source: TensorSource, expected: tuple[int, ...]) -> None:
    if tuple(source.shape) != expected:
        raise ValueError(f"checkpoint shape {tuple(source.shape)} does not match the unsharded shape {expected}")


def _load_rows(param: nn.Parameter, source: TensorSource, *, start: int, end: int, full_shape: tuple[int, int]) -> None:
    """Copy rows ``[start, end)`` of ``source``; zero the padding rows after them."""
    _check_shape(source, full_shape)
    param.data[: end - start].copy_(source[start:end])
    param.data[end - start :].zero_()


def _load_columns(
    param: nn.Parameter, source: TensorSource, *, start: int, end: int, full_shape: tuple[int, int]
) -> None:
    """Copy columns ``[start, end)`` of ``source``."""
    _check_shape(source, full_shape)
    param.data.copy_(source[:, start:end])


class ColumnParallelLinear(Linear):
    """A linear whose output features (weight rows) are split: this rank computes its block of them.

    ``partition`` says which block. For Q, gate and up it is (rank, world size); K and V use
    a partition over KV heads, which may give several ranks the same block (replicated KV heads).
    """

    def __init__(self, in_features: int, out_features: int, partition: Partition) -> None:
        start, end = partition.bounds(out_features)
        super().__init__(in_features, end - start)
        self.partition = partition
        self.weight.weight_loader = functools.partial(
            _load_rows, start=start, end=end, full_shape=(out_features, in_features)
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, partition={self.partition.index}/{self.partition.count}"


class RowParallelLinear(Linear):
    """A linear whose input features (weight columns) are split; partial products are all-reduced.

    Its input is the matching block of a ``ColumnParallelLinear``'s output, so the pair needs
    no communication in between. Every rank returns the full output.
    """

    def __init__(self, in_features: int, out_features: int, partition: Partition) -> None:
        start, end = partition.bounds(in_features)
        super().__init__(end - start, out_features)
        self.partition = partition
        self.weight.weight_loader = functools.partial(
            _load_columns, start=start, end=end, full_shape=(out_features, in_features)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(super().forward(x), self.partition.count)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, partition={self.partition.index}/{self.partition.count}"


class VocabParallelEmbedding(nn.Module):
    """Token embedding whose vocabulary rows are split; each rank embeds the ids it holds.

    Ids outside this rank's rows embed to zeros, so the all-reduce sums exactly one real
    row per token. A vocabulary that ``partition.count`` does not divide is padded with zero
    rows (see ``Partition.padded_bounds``).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, partition: Partition) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.partition = partition
        self.vocab_start, self.vocab_end, padded_size = partition.padded_bounds(num_embeddings)
        # [padded_size, embedding_dim]; rows past vocab_end - vocab_start are padding.
        self.weight = nn.Parameter(torch.empty(padded_size, embedding_dim), requires_grad=False)
        self.weight.weight_loader = functools.partial(
            _load_rows,
            start=self.vocab_start,
            end=self.vocab_end,
            full_shape=(num_embeddings, embedding_dim),
        )

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_local = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        # Out-of-shard ids look up local row 0 (a valid index) and are then zeroed.
        local_ids = torch.where(is_local, input_ids - self.vocab_start, 0)
        hidden = F.embedding(local_ids, self.weight)  # [num_tokens, embedding_dim]
        hidden = hidden.masked_fill(~is_local.unsqueeze(-1), 0)
        return all_reduce(hidden, self.partition.count)

    def extra_repr(self) -> str:
        return (
            f"num_embeddings={self.num_embeddings}, rows=[{self.vocab_start}, {self.vocab_end}), "
            f"partition={self.partition.index}/{self.partition.count}"
        )


class ParallelLMHead(Linear):
    """The LM head with its vocabulary rows split; every rank gets the full logits by all-gather.

    The weight is [padded_size, hidden_size] with the same rows as ``VocabParallelEmbedding``
    over the same partition, so a tied head can share the embedding's parameter.
    """

    def __init__(self, hidden_size: int, vocab_size: int, partition: Partition) -> None:
        start, end, padded_size = partition.padded_bounds(vocab_size)
        super().__init__(hidden_size, padded_size)
        self.vocab_size = vocab_size
        self.partition = partition
        self.weight.weight_loader = functools.partial(
            _load_rows, start=start, end=end, full_shape=(vocab_size, hidden_size)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # local: [num_rows, padded_size] -> gathered: [num_rows, count * padded_size]; the
        # padding rows all sit at the end, after the last real vocabulary id.
        logits = all_gather_last_dim(super().forward(x), self.partition.count)
        return logits[..., : self.vocab_size]

    def extra_repr(self) -> str:
        partition = f"{self.partition.index}/{self.partition.count}"
        return f"{super().extra_repr()}, vocab_size={self.vocab_size}, partition={partition}"

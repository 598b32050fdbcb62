"""What attention needs to know about a flat token batch.

Tokens of several sequences are packed along one dimension with no per-sequence padding
(the batch as a whole is padded up to a bucket). For sequence ``s`` the tokens computed this
step are ``query_start_loc[s]:query_start_loc[s + 1]``; they are always the last tokens of
its context, so query ``i`` of ``L`` sits at position ``seq_lens[s] - L + i``::

    context of seq s:  | already in the KV cache | this step's L tokens |
                       0                     seq_lens[s] - L        seq_lens[s]

Block 0 of every KV pool is reserved: padding tokens write their K/V there (slot 0..) so
that the cache write keeps a static shape and never touches a sequence's blocks.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from neuron_llm.transfer import to_device

NULL_BLOCK_ID = 0


@dataclass
class AttentionMetadata:
    """Tensors on the model's device, plus host copies for backends that loop on the host."""

    slot_mapping: torch.Tensor
    """[num_tokens] int64: flat KV slot (block_id * block_size + offset) each token writes."""
    block_tables: torch.Tensor
    """[num_seqs, max_blocks_per_seq] int32: KV blocks of each sequence, in order."""
    seq_lens: torch.Tensor
    """[num_seqs] int32: context length of each sequence after this step."""
    query_start_loc: torch.Tensor
    """[num_seqs + 1] int32: offsets of each sequence's tokens in the flat batch."""
    seq_lens_host: list[int]
    query_start_loc_host: list[int]

    is_decode: bool
    """Every (real) sequence computes exactly one token: token ``s`` belongs to sequence ``s``."""

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)

    @functools.cached_property
    def num_context_tokens(self) -> int:
        """Tokens the batch's sequences attend to, summed (read by every layer's attention)."""
        return sum(self.seq_lens_host)

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str,
        num_padded_tokens: int | None = None,
        num_padded_seqs: int | None = None,
        max_blocks_per_seq: int | None = None,
    ) -> AttentionMetadata:
        """Build the metadata of a flat batch from per-sequence host lists.

        ``query_lens[s]`` tokens of sequence ``s`` are computed; after the step it holds
        ``seq_lens[s]`` tokens stored in ``block_tables[s]``. Padding (to a bucket) adds tokens
        that write to the null block and sequences with no tokens and an empty context.
        """
        assert len(query_lens) == len(seq_lens) == len(block_tables)
        num_slots = sum(query_lens)
        num_tokens = num_padded_tokens or num_slots
        num_seqs = num_padded_seqs or len(seq_lens)
        assert num_tokens >= num_slots and num_seqs >= len(seq_lens)
        width = max_blocks_per_seq or max((len(t) for t in block_tables), default=1)
        slots = np.empty(num_tokens, dtype=np.int64)
        tables = np.empty((num_seqs, width), dtype=np.int32)
        lens = np.empty(num_seqs, dtype=np.int32)
        starts = np.empty(num_seqs + 1, dtype=np.int32)
        write_host_arrays(query_lens, seq_lens, block_tables, block_size, slots, tables, lens, starts)
        seq_lens_host, starts_host = lens.tolist(), starts.tolist()
        return cls(
            slot_mapping=to_device(slots, torch.int64, device),
            block_tables=to_device(tables, torch.int32, device),
            seq_lens=to_device(lens, torch.int32, device),
            query_start_loc=to_device(starts, torch.int32, device),
            seq_lens_host=seq_lens_host,
            query_start_loc_host=starts_host,
            is_decode=all(query_len == 1 for query_len in query_lens),
        )


def write_host_arrays(
    query_lens: list[int],
    seq_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    slot_mapping: np.ndarray,
    tables: np.ndarray,
    lens: np.ndarray,
    query_start_loc: np.ndarray,
) -> None:
    """Write a flat batch's metadata (as ``AttentionMetadata.build`` takes it) into host arrays
    of its padded shapes: [num_tokens], [num_seqs, width], [num_seqs] and [num_seqs + 1].

    Padding tokens write to the null block's slots; padding sequences have no tokens and an
    empty context. Numpy, as nested Python lists of a 64 x 512 table took milliseconds a step.
    """
    num_real = len(seq_lens)
    tables.fill(NULL_BLOCK_ID)
    for row, (query_len, seq_len, table) in enumerate(zip(query_lens, seq_lens, block_tables)):
        assert 0 < query_len <= seq_len <= len(table) * block_size, (query_len, seq_len, len(table))
        tables[row, : len(table)] = table
    lens[:num_real] = seq_lens
    lens[num_real:] = 0
    new_tokens = np.asarray(query_lens, dtype=np.int64)
    query_start_loc[0] = 0
    np.cumsum(new_tokens, out=query_start_loc[1 : num_real + 1])
    query_start_loc[num_real + 1 :] = query_start_loc[num_real]
    # Token t of sequence s sits at position seq_lens[s] - query_lens[s] + (t - starts[s]).
    token_seq = np.repeat(np.arange(num_real), new_tokens)
    num_slots = len(token_seq)
    positions = np.arange(num_slots) - query_start_loc[token_seq] + lens[token_seq] - new_tokens[token_seq]
    blocks = tables[token_seq, positions // block_size].astype(np.int64)
    slot_mapping[:num_slots] = blocks * block_size + positions % block_size
    slot_mapping[num_slots:] = NULL_BLOCK_ID * block_size

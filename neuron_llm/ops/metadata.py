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
        num_real = len(seq_lens)
        num_slots = sum(query_lens)
        num_tokens = num_padded_tokens or num_slots
        num_seqs = num_padded_seqs or num_real
        assert num_tokens >= num_slots and num_seqs >= num_real
        width = max_blocks_per_seq or max((len(t) for t in block_tables), default=1)
        # Built in numpy: nested Python lists of a 64 x 512 table took milliseconds a step.
        tables = np.full((num_seqs, width), NULL_BLOCK_ID, dtype=np.int32)
        for row, (query_len, seq_len, table) in enumerate(zip(query_lens, seq_lens, block_tables)):
            assert 0 < query_len <= seq_len <= len(table) * block_size, (query_len, seq_len, len(table))
            tables[row, : len(table)] = table
        lens = np.zeros(num_seqs, dtype=np.int32)
        lens[:num_real] = seq_lens
        new_tokens = np.asarray(query_lens, dtype=np.int64)
        starts = np.zeros(num_seqs + 1, dtype=np.int32)
        np.cumsum(new_tokens, out=starts[1 : num_real + 1])
        starts[num_real + 1 :] = starts[num_real]
        # Token t of sequence s sits at position seq_lens[s] - query_lens[s] + (t - starts[s]).
        token_seq = np.repeat(np.arange(num_real), new_tokens)
        positions = np.arange(num_slots) - starts[token_seq] + lens[token_seq] - new_tokens[token_seq]
        slots = np.full(num_tokens, NULL_BLOCK_ID * block_size, dtype=np.int64)
        slots[:num_slots] = (
            tables[token_seq, positions // block_size].astype(np.int64) * block_size + positions % block_size
        )
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

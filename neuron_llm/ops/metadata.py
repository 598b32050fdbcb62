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

from dataclasses import dataclass

import torch

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
        slots: list[int] = []
        for query_len, seq_len, table in zip(query_lens, seq_lens, block_tables):
            assert 0 < query_len <= seq_len <= len(table) * block_size, (query_len, seq_len, len(table))
            for position in range(seq_len - query_len, seq_len):
                slots.append(table[position // block_size] * block_size + position % block_size)
        num_tokens = num_padded_tokens or len(slots)
        num_seqs = num_padded_seqs or len(seq_lens)
        assert num_tokens >= len(slots) and num_seqs >= len(seq_lens)
        slots += [NULL_BLOCK_ID * block_size] * (num_tokens - len(slots))
        width = max_blocks_per_seq or max((len(t) for t in block_tables), default=1)
        tables = [t + [NULL_BLOCK_ID] * (width - len(t)) for t in block_tables]
        tables += [[NULL_BLOCK_ID] * width] * (num_seqs - len(tables))
        lens = list(seq_lens) + [0] * (num_seqs - len(seq_lens))
        starts = [0]
        for query_len in query_lens:
            starts.append(starts[-1] + query_len)
        starts += [starts[-1]] * (num_seqs - len(query_lens))
        return cls(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
            seq_lens_host=lens,
            query_start_loc_host=starts,
            is_decode=all(query_len == 1 for query_len in query_lens),
        )

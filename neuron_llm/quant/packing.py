"""compressed-tensors' "pack-quantized" layout for 8-bit integers: four int8 values per int32.

llm-compressor writes int8 weight-only (W8A16) checkpoints this way, and vLLM reads them so.
Each value is offset by +128 (to 0..255) and value ``i`` of every four consecutive ones along
a row fills bits ``8 * (i % 4)`` of one int32 word; a row whose length is not a multiple of
four is padded with zeros. Shifts are written out rather than reinterpreting bytes, so the
layout does not depend on the host's byte order.
"""

from __future__ import annotations

import torch

_OFFSET = 128
_VALUES_PER_WORD = 4


def packed_columns(columns: int) -> int:
    """int32 words that hold ``columns`` int8 values."""
    return -(-columns // _VALUES_PER_WORD)


def pack_int8(q: torch.Tensor) -> torch.Tensor:
    """Pack int8 ``q`` [rows, cols] into int32 [rows, ceil(cols / 4)]."""
    rows, cols = q.shape
    padding = packed_columns(cols) * _VALUES_PER_WORD - cols
    # Padding is zero bits, as compressed-tensors pads.
    biased = torch.nn.functional.pad(q.to(torch.int64) + _OFFSET, (0, padding))
    biased = biased.view(rows, -1, _VALUES_PER_WORD)  # [rows, words, 4]
    shifts = torch.arange(0, 32, 8, dtype=torch.int64, device=q.device)
    words = (biased << shifts).sum(dim=-1)  # [rows, words], in [0, 2**32)
    # Words of 2**31 and above are the same 32 bits read as a negative int32.
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def unpack_int8(packed: torch.Tensor, columns: int, first_column: int = 0) -> torch.Tensor:
    """Unpack int32 words into int8 [rows, columns], starting at value ``first_column`` of the words.

    ``first_column`` lets a caller that read only some words (a tensor-parallel shard) drop
    the values before its first column within the first word.
    """
    words = packed.to(torch.int64) & 0xFFFFFFFF  # [rows, words]
    shifts = torch.arange(0, 32, 8, dtype=torch.int64, device=packed.device)
    values = (words.unsqueeze(-1) >> shifts) & 0xFF  # [rows, words, 4]
    values = values.reshape(packed.shape[0], -1)[:, first_column : first_column + columns]
    return (values - _OFFSET).to(torch.int8)

"""N-gram prompt lookup (Saxena, 2023, https://github.com/apoorvumang/prompt-lookup-decoding;
vLLM's "ngram" method): where the sequence's last ``n`` tokens occurred before, propose the
tokens that followed them then. It costs no model and pays where output repeats its input:
summaries, edits, extraction, code.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from neuron_llm.config import SpeculativeConfig


class NgramProposer:
    """Proposes up to ``num_speculative_tokens`` tokens from the sequence itself."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.num_tokens = config.num_speculative_tokens
        self.min_n = config.prompt_lookup_min
        self.max_n = config.prompt_lookup_max

    def propose(self, token_ids: Sequence[int]) -> list[int]:
        """The tokens after the latest earlier occurrence of the longest matching suffix
        (``prompt_lookup_max`` tokens down to ``prompt_lookup_min``) that has
        ``num_speculative_tokens`` after it, else after the latest one; empty when none occurs."""
        tokens = np.asarray(token_ids, dtype=np.int64)
        for n in range(min(self.max_n, len(tokens) - 1), self.min_n - 1, -1):
            # Windows starting before the suffix itself: the last one ends a token before it.
            windows = sliding_window_view(tokens[:-1], n)
            matches = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
            if matches.size:
                # The latest occurrence with a whole proposal after it: in a repeat of a short
                # period the latest one is followed only by the period's tokens.
                whole = matches[matches + n + self.num_tokens <= len(tokens)]
                start = int((whole if whole.size else matches)[-1]) + n
                return tokens[start : start + self.num_tokens].tolist()
        return []

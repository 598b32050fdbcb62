"""N-gram prompt lookup (Saxena, 2023, https://github.com/apoorvumang/prompt-lookup-decoding;
vLLM's "ngram" method): where the sequence's last ``n`` tokens occurred before, propose the
tokens that followed them then. It costs no model and pays where output repeats its input:
summaries, edits, extraction, code.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

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
        length = len(token_ids)
        max_n = min(self.max_n, length - 1)
        if max_n < self.min_n:
            return []
        tokens = token_ids if isinstance(token_ids, np.ndarray) else np.fromiter(token_ids, np.int64, length)
        # Earlier occurrences end where the last token occurs before the end; each matches the
        # suffix as far back as the tokens before it agree (one pass over the sequence, then
        # at most max_n steps over the few occurrences, not a pass per suffix length).
        ends = np.flatnonzero(tokens[:-1] == tokens[-1])
        matched = np.ones(ends.size, dtype=np.int64)
        for back in range(1, max_n):
            earlier = ends - back
            agrees = (matched == back) & (earlier >= 0)
            agrees[agrees] = tokens[earlier[agrees]] == tokens[length - 1 - back]
            matched[agrees] = back + 1
        for n in range(max_n, self.min_n - 1, -1):
            starts = ends[matched >= n] - (n - 1)
            if starts.size:
                # The latest occurrence with a whole proposal after it: in a repeat of a short
                # period the latest one is followed only by the period's tokens.
                whole = starts[starts + n + self.num_tokens <= length]
                start = int((whole if whole.size else starts)[-1]) + n
                return tokens[start : start + self.num_tokens].tolist()
        return []

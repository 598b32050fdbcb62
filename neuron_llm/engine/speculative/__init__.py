"""Proposers for speculative decoding: cheap guesses of a sequence's next tokens, which one
model step verifies (``neuron_llm.sample.rejection``)."""

from collections.abc import Sequence
from typing import Protocol

from neuron_llm.engine.speculative.ngram import NgramProposer


class Proposer(Protocol):
    """Guesses the tokens after ``token_ids`` (prompt and output so far); empty: no guess.

    The engine passes ``Request.token_array()``, an int64 NumPy array; a list works too.

    Deterministic guesses (a point mass) are what the rejection sampler assumes.
    """

    def propose(self, token_ids: Sequence[int]) -> list[int]: ...


__all__ = ["NgramProposer", "Proposer"]

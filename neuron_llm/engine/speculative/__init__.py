"""Proposers for speculative decoding: cheap guesses of a sequence's next tokens, which one
model step verifies (``neuron_llm.sample.rejection``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import torch

from neuron_llm.config import EngineConfig
from neuron_llm.engine.speculative.draft import DraftModelProposer
from neuron_llm.engine.speculative.ngram import NgramProposer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class Proposer(Protocol):
    """Guesses the tokens after ``token_ids`` (prompt and output so far); empty: no guess.

    The engine passes ``Request.token_array()``, an int64 NumPy array; a list works too. A
    proposer that also has ``propose_all(sequences, rooms) -> list[list[int]]`` is given a
    step's sequences at once instead, with the most tokens each can verify (a draft model
    decodes them in one batch, no further than that).

    Deterministic guesses (a point mass) are what the rejection sampler assumes.
    """

    def propose(self, token_ids: Sequence[int]) -> list[int]: ...


def make_proposer(
    config: EngineConfig,
    num_kv_blocks: int,
    tokenizer: PreTrainedTokenizerBase | None = None,
    device: torch.device | str | None = None,
) -> Proposer | None:
    """The proposer ``config.speculative`` asks for (a draft model on ``device`` with a pool of
    ``num_kv_blocks`` blocks, its tokenizer checked against the model's ``tokenizer``); None
    when speculation is off."""
    if config.speculative is None:
        return None
    if config.speculative.method == "draft_model":
        return DraftModelProposer(config, num_kv_blocks, tokenizer, device)
    return NgramProposer(config.speculative)


__all__ = ["DraftModelProposer", "NgramProposer", "Proposer", "make_proposer"]

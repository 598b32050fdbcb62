"""Engine logprobs (``{token_id: Logprob}`` per position) in OpenAI's two response shapes."""

from __future__ import annotations

import math
from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from neuron_llm.outputs import Logprob
from neuron_llm.serve.protocol import ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob

_MIN_LOGPROB = -9999.0
"""Stands for -inf, which JSON cannot carry (vLLM's choice too)."""


class TokenTexts:
    """The text of each token id alone, cached: logprobs name tokens by their text.

    A token that is part of a multi-byte character decodes to U+FFFD on its own, as in vLLM.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None) -> None:
        self._tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        if token_id not in self._texts:
            self._texts[token_id] = self._decode(token_id)
        return self._texts[token_id]

    def _decode(self, token_id: int) -> str:
        if self._tokenizer is None:
            return f"token_id:{token_id}"
        return str(self._tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False))


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else _MIN_LOGPROB


def completion_logprobs(
    texts: TokenTexts,
    token_ids: Sequence[int],
    logprobs: Sequence[dict[int, Logprob] | None],
    text_offset: int = 0,
) -> CompletionLogprobs:
    """The ``logprobs`` of a completion choice for ``token_ids``; offsets count from ``text_offset``.

    A position without logprobs (the first prompt token, under ``echo``) gets None entries.
    Each position's ``top_logprobs`` holds the chosen token and the most likely ones.
    """
    result = CompletionLogprobs()
    for token_id, entry in zip(token_ids, logprobs):
        text = texts(token_id)
        result.tokens.append(text)
        result.text_offset.append(text_offset)
        text_offset += len(text)
        if entry is None:
            result.token_logprobs.append(None)
            result.top_logprobs.append(None)
        else:
            result.token_logprobs.append(_finite(entry[token_id].logprob))
            result.top_logprobs.append({texts(top_id): _finite(top.logprob) for top_id, top in entry.items()})
    return result


def chat_logprobs(
    texts: TokenTexts, token_ids: Sequence[int], logprobs: Sequence[dict[int, Logprob]], num_top: int
) -> ChatLogprobs:
    """The ``logprobs`` of a chat choice: each token with its ``num_top`` most likely alternatives."""
    content = []
    for token_id, entry in zip(token_ids, logprobs):
        ranked = sorted(
            (top.rank, top_id, top) for top_id, top in entry.items() if top.rank is not None and top.rank <= num_top
        )
        content.append(
            TokenLogprob(
                **_top(texts(token_id), entry[token_id].logprob),
                top_logprobs=[TopLogprob(**_top(texts(top_id), top.logprob)) for _, top_id, top in ranked],
            )
        )
    return ChatLogprobs(content=content)


def _top(text: str, logprob: float) -> dict[str, object]:
    return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode("utf-8"))}

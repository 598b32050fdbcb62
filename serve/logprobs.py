"""Engine logprobs (``{token_id: Logprob}`` per position) in OpenAI's two response shapes."""

from __future__ import annotations

import math
from collections.abc import Sequence

from neuron_llm.detokenizer import TokenTexts
from neuron_llm.outputs import Logprob
from neuron_llm.serve.protocol import ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob

_MIN_LOGPROB = -9999.0
"""Stands for -inf, which JSON cannot carry (vLLM's choice too)."""


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
        # By logprob, not rank: a sampled token tied with others has the last of their ranks.
        best = sorted(entry.items(), key=lambda item: (-item[1].logprob, item[1].rank or 0))[:num_top]
        content.append(
            TokenLogprob(
                **_top(texts(token_id), entry[token_id].logprob),
                top_logprobs=[TopLogprob(**_top(texts(top_id), top.logprob)) for top_id, top in best],
            )
        )
    return ChatLogprobs(content=content)


def _top(text: str, logprob: float) -> dict[str, object]:
    return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode("utf-8"))}

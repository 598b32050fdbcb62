"""Engine logprobs (``{token_id: Logprob}`` per position) in OpenAI's two response shapes."""

from __future__ import annotations

import codecs
import json
import math
from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from neuron_llm.detokenizer import TokenTexts
from neuron_llm.outputs import Logprob
from neuron_llm.serve.protocol import ChatLogprobs, CompletionLogprobs, PromptLogprob, TokenLogprob, TopLogprob

_MIN_LOGPROB = -9999.0
"""Stands for -inf, which JSON cannot carry (vLLM's choice too)."""


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else _MIN_LOGPROB


def completion_logprobs(
    texts: TokenTexts,
    token_ids: Sequence[int],
    logprobs: Sequence[dict[int, Logprob] | None],
    text_offsets: Sequence[int],
    num_top: int | None = None,
) -> CompletionLogprobs:
    """The ``logprobs`` of a completion choice for ``token_ids``, which begin at ``text_offsets``.

    A position without logprobs (the first prompt token, under ``echo``) gets None entries.
    Each position's ``top_logprobs`` holds the chosen token and the most likely ones (at most
    ``num_top`` of them, when given).
    """
    result = CompletionLogprobs()
    for token_id, entry, offset in zip(token_ids, logprobs, text_offsets, strict=True):
        result.tokens.append(token_name(texts, token_id))
        result.text_offset.append(offset)
        if entry is None:
            result.token_logprobs.append(None)
            result.top_logprobs.append(None)
        else:
            result.token_logprobs.append(_finite(entry[token_id].logprob))
            best = entry.items() if num_top is None else _most_likely(entry, num_top)
            top = {token_name(texts, top_id): _finite(top.logprob) for top_id, top in best}
            top[token_name(texts, token_id)] = result.token_logprobs[-1]  # kept should two names meet
            result.top_logprobs.append(top)
    return result


def token_name(texts: TokenTexts, token_id: int) -> str:
    """How OpenAI's logprobs name a token: the text of its bytes, or ``bytes:\\xe4\\xbd`` when
    they are not whole characters (part of one, or a byte that is none).

    Tokens of distinct bytes get distinct names, so they do not share a key of
    ``top_logprobs``: decoded alone, every part of a character would be U+FFFD, and
    SentencePiece's "▁a" would be "a", as "a" is.
    """
    raw = texts.raw_bytes(token_id)
    if not raw:
        return texts(token_id)  # no tokenizer: "token_id:N"
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{byte:02x}" for byte in raw)


class TextOffsets:
    """Where each token of a sequence begins in its decoded text, in characters.

    Counted on the tokens' bytes, so a token holding part of a character begins where that
    character does, whichever tokens complete it, and the offset is known when the token
    arrives (a stream cannot revise it). A special token the text leaves out adds nothing.
    ``context_token_ids`` (the prompt) may end inside a character: the detokenizer's text
    holds that character in neither the prompt's text nor the output's, and nor do these.
    """

    def __init__(
        self,
        texts: TokenTexts,
        start: int = 0,
        skip_special_tokens: bool = True,
        context_token_ids: Sequence[int] = (),
    ) -> None:
        self._texts = texts
        self._skip_special_tokens = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._length = start
        # A character spans at most 4 bytes, so the last 4 tokens hold any unfinished one.
        self._utf8.decode(b"".join(map(self._bytes, context_token_ids[-4:])))
        pending, _ = self._utf8.getstate()
        self._hidden = 1 if pending else 0
        """Characters still to come out that the text does not hold."""
        self._at_text_start = not any(map(self._bytes, context_token_ids))
        """No byte is out yet: a SentencePiece decoder drops the next token's leading space."""

    def __call__(self, token_ids: Sequence[int]) -> list[int]:
        """The offsets of ``token_ids``, which follow the tokens given before."""
        offsets = []
        for token_id in token_ids:
            raw = self._bytes(token_id)
            if self._at_text_start and raw:
                self._at_text_start = False
                if raw.startswith(b" ") and not self._texts(token_id).startswith(" "):
                    raw = raw[1:]
            # Its first byte settles the bytes held before it. If that byte went into the last
            # character out (completing it, or a character of its own), the token begins
            # there; if it is held (it leads a character), after every character out.
            before = self._count(self._utf8.decode(raw[:1]))
            pending, _ = self._utf8.getstate()
            offsets.append(self._length + before - (1 if before and not pending else 0))
            self._length += before + self._count(self._utf8.decode(raw[1:]))
        return offsets

    @property
    def length(self) -> int:
        """The characters of the text so far, an incomplete last one left out."""
        return self._length

    def _bytes(self, token_id: int) -> bytes:
        if self._skip_special_tokens and self._texts.is_special(token_id):
            return b""
        return self._texts.raw_bytes(token_id)

    def _count(self, characters: str) -> int:
        hidden = min(self._hidden, len(characters))
        self._hidden -= hidden
        return len(characters) - hidden


def prompt_text_offsets(
    texts: TokenTexts, tokenizer: PreTrainedTokenizerBase | None, text: str, token_ids: Sequence[int]
) -> list[int]:
    """Where each of ``token_ids`` begins in ``text``, the prompt they encode."""
    if tokenizer is not None and tokenizer.is_fast and not _trims_offsets(tokenizer):
        encoding = tokenizer(text, return_offsets_mapping=True)
        # When the text encodes to these ids, the tokenizer knows each one's span, including
        # tokens it added (a BOS) that the text does not hold.
        if encoding["input_ids"] == list(token_ids):
            return [start for start, _ in encoding["offset_mapping"]]
    offsets = TextOffsets(texts, skip_special_tokens=False)
    starts = offsets(token_ids)
    # Decoding a whole sequence may drop a leading space (SentencePiece) that the bytes hold.
    dropped = max(0, offsets.length - len(text))
    return [max(0, start - dropped) for start in starts]


def _trims_offsets(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer's offsets leave out a token's leading space (GPT-2's post-processor
    does): OpenAI's text_offset is where the token's text begins, its space included."""
    processor = tokenizer.backend_tokenizer.post_processor
    if processor is None:
        return False
    state = json.loads(processor.__getstate__())
    return any(part.get("trim_offsets") for part in (state, *state.get("processors", ())))


def chat_logprobs(
    texts: TokenTexts, token_ids: Sequence[int], logprobs: Sequence[dict[int, Logprob]], num_top: int
) -> ChatLogprobs:
    """The ``logprobs`` of a chat choice: each token with its ``num_top`` most likely alternatives."""
    content = []
    for token_id, entry in zip(token_ids, logprobs):
        best = _most_likely(entry, num_top)
        content.append(
            TokenLogprob(
                **_top(texts, token_id, entry[token_id].logprob),
                top_logprobs=[TopLogprob(**_top(texts, top_id, top.logprob)) for top_id, top in best],
            )
        )
    return ChatLogprobs(content=content)


def _most_likely(entry: dict[int, Logprob], num_top: int) -> list[tuple[int, Logprob]]:
    # By logprob, not rank: a sampled token tied with others has the last of their ranks.
    return sorted(entry.items(), key=lambda item: (-item[1].logprob, item[1].rank or 0))[:num_top]


def _top(texts: TokenTexts, token_id: int, logprob: float) -> dict[str, object]:
    # OpenAI's bytes: the token's own, so the tokens of a split character join into it.
    return {"token": token_name(texts, token_id), "logprob": _finite(logprob), "bytes": list(texts.raw_bytes(token_id))}


def prompt_logprobs(
    texts: TokenTexts, logprobs: Sequence[dict[int, Logprob] | None]
) -> list[dict[str, PromptLogprob] | None]:
    """vLLM's ``prompt_logprobs`` of a reply: per prompt position, token id (a JSON key) -> its logprob."""
    return [
        None
        if entry is None
        else {
            str(token_id): PromptLogprob(
                logprob=_finite(logprob.logprob), rank=logprob.rank, decoded_token=token_name(texts, token_id)
            )
            for token_id, logprob in entry.items()
        }
        for entry in logprobs
    ]

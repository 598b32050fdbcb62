"""Server-sent events: engine delta outputs into the per-choice deltas sent, and the event framing."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel

from neuron_llm.outputs import Logprob, RequestOutput
from neuron_llm.serve.errors import ServeError

DONE_EVENT = "data: [DONE]\n\n"


def event(payload: BaseModel) -> str:
    """One ``data:`` event carrying ``payload`` as JSON."""
    return f"data: {payload.model_dump_json()}\n\n"


def error_event(error: ServeError) -> str:
    """The event that reports a failure after the response has started (its status is already 200)."""
    return f"data: {error.body_json()}\n\n"


@dataclass
class ChoiceDelta:
    """What one choice gained since the previous event."""

    index: int
    """The choice's index in the response: prompt index * n + completion index."""
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None
    stop_reason: int | str | None
    """The stop string or stop token id that ended the choice (``CompletionOutput.stop_reason``)."""
    is_first: bool
    """Whether nothing was sent for this choice before."""
    num_tokens: int
    """The choice's tokens so far, this delta's included."""

    @classmethod
    def joined(cls, deltas: list[ChoiceDelta]) -> ChoiceDelta:
        """One delta of a choice's consecutive ``deltas``."""
        first, last = deltas[0], deltas[-1]
        logprobs = None if first.logprobs is None else [entry for d in deltas for entry in d.logprobs or ()]
        return cls(
            first.index,
            "".join(d.text for d in deltas),
            [token for d in deltas for token in d.token_ids],
            logprobs,
            last.finish_reason,
            last.stop_reason,
            first.is_first,
            last.num_tokens,
        )


class DeltaTracker:
    """Turns a stream's "delta" outputs into the choice deltas to send.

    Tokens that brought no text yet (the start of a multi-byte character, text held back for
    a possible stop string) are held and sent with the next piece, unless their logprobs are
    worth sending alone.

    Args:
        n: completions per prompt.
        has_logprobs: whether tokens matter on their own (a delta with new tokens but no new
            text is then still sent, for their logprobs).
    """

    def __init__(self, n: int, has_logprobs: bool) -> None:
        self._n = n
        self._has_logprobs = has_logprobs
        self._held: dict[int, ChoiceDelta] = {}
        self._num_tokens: dict[int, int] = {}
        self._started: set[int] = set()
        self._cached_tokens: dict[int, int] = {}
        self.num_generated_tokens = 0
        """Tokens of the choices that have finished."""

    def cached_tokens(self, prompt_index: int | None = None) -> int | None:
        """Prompt tokens found in the prefix cache: one prompt's, or every prompt's summed; None
        before any output said (a request counts them once it is scheduled)."""
        if prompt_index is not None:
            return self._cached_tokens.get(prompt_index)
        return sum(self._cached_tokens.values()) if self._cached_tokens else None

    def deltas(self, prompt_index: int, output: RequestOutput) -> list[ChoiceDelta]:
        """The choices of ``output`` that gained text, tokens worth sending, or their end."""
        if output.num_cached_tokens is not None:
            self._cached_tokens[prompt_index] = output.num_cached_tokens
        deltas = []
        for completion in output.outputs:
            index = prompt_index * self._n + completion.index
            num_tokens = self._num_tokens.get(index, 0) + len(completion.token_ids)
            self._num_tokens[index] = num_tokens
            delta = ChoiceDelta(
                index,
                completion.text,
                completion.token_ids,
                completion.logprobs,
                completion.finish_reason,
                completion.stop_reason,
                is_first=index not in self._started,
                num_tokens=num_tokens,
            )
            held = self._held.pop(index, None)
            if held is not None:
                delta = ChoiceDelta.joined([held, delta])
            if not delta.text and not (self._has_logprobs and delta.token_ids) and delta.finish_reason is None:
                self._held[index] = delta
                continue
            deltas.append(delta)
            self._started.add(index)
            if delta.finish_reason is not None:
                self.num_generated_tokens += num_tokens
        return deltas

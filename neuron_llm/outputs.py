"""What a request returns, shaped like vLLM's ``RequestOutput`` so its users know the fields.

A streaming caller receives one ``RequestOutput`` per engine step that advanced the request,
holding all of it so far ("cumulative") or what the step added ("delta",
``SamplingParams.output_kind``); ``finished`` is set on the last one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

FinishReason = Literal["stop", "length", "abort"]


@dataclass
class Logprob:
    """The log-probability of one token at one position."""

    logprob: float
    """Natural log of the token's probability under the model's raw distribution."""
    rank: int | None = None
    """1 for the most likely token; None when not computed."""
    decoded_token: str | None = None
    """The token's text, when the caller asked for it to be decoded."""


SampleLogprobs = list[dict[int, Logprob]]
"""Per generated position: token id -> Logprob for the sampled token and the top-k tokens."""

PromptLogprobs = list[dict[int, Logprob] | None]
"""Per prompt position; the first is None since nothing predicts the first prompt token."""


@dataclass
class CompletionOutput:
    """One of the ``n`` completions of a request."""

    index: int
    """Which of the request's ``n`` completions this is."""
    text: str
    """Generated text so far (or the newest piece, for delta streaming), stop strings excluded."""
    token_ids: list[int]
    """Generated token ids, including the token that completed a stop string or was EOS."""
    cumulative_logprob: float | None = None
    """Sum of the sampled tokens' logprobs; None when logprobs were not requested."""
    logprobs: SampleLogprobs | None = None
    """Per generated token, when ``SamplingParams.logprobs`` is set."""
    finish_reason: FinishReason | None = None
    """"stop" (EOS, a stop token or a stop string) or "length" (max_tokens or context); vLLM's
    "abort" is never given: an aborted request gives no output."""
    stop_reason: str | int | None = None
    """The stop string or stop token id that ended the sequence; None for EOS or length."""

    def finished(self) -> bool:
        """Whether this completion has ended (a method, as in vLLM)."""
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Timestamps of a request's life, in ``time.monotonic()`` seconds; None until reached."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    """The state of one request as returned to the caller."""

    request_id: str
    prompt: str | None
    """The prompt text; None when the request was given token ids."""
    prompt_token_ids: list[int]
    prompt_logprobs: PromptLogprobs | None
    """Per prompt token, when ``SamplingParams.prompt_logprobs`` is set."""
    outputs: list[CompletionOutput]
    finished: bool
    """Whether every completion has ended."""
    metrics: RequestMetrics | None = None
    num_cached_tokens: int | None = None
    """Prompt tokens found in the prefix cache when the request was first scheduled (vLLM's);
    None before it was."""

    def add(self, newer: RequestOutput) -> RequestOutput:
        """This delta output followed by ``newer``, the request's next one, as one delta (as
        vLLM's ``RequestOutput.add``): text, tokens and logprobs joined, the rest ``newer``'s."""
        return join_deltas([self, newer])


def join_deltas(outputs: Sequence[RequestOutput]) -> RequestOutput:
    """One request's consecutive "delta" outputs as one: each completion's text, tokens and
    logprobs joined (each list once, however many outputs), the rest the last output's."""
    pieces: dict[int, list[CompletionOutput]] = {}
    for output in outputs:
        for completion in output.outputs:
            pieces.setdefault(completion.index, []).append(completion)
    completions = []
    for index in sorted(pieces):
        parts = pieces[index]
        logprobs = None if parts[0].logprobs is None else [entry for part in parts for entry in part.logprobs or ()]
        completions.append(
            replace(
                parts[-1],
                text="".join(part.text for part in parts),
                token_ids=[token for part in parts for token in part.token_ids],
                logprobs=logprobs,
            )
        )
    prompt_logprobs = next((output.prompt_logprobs for output in outputs if output.prompt_logprobs is not None), None)
    return replace(outputs[-1], prompt_logprobs=prompt_logprobs, outputs=completions)

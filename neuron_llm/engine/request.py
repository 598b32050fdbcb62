"""One generation request and the bookkeeping the scheduler keeps on it."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


class SamplingParamsLike(Protocol):
    """The part of a request's sampling parameters the scheduler reads; the sampler reads the rest."""

    @property
    def max_tokens(self) -> int | None:
        """Most tokens generated; None is bounded only by max_model_len."""
        ...


class RequestStatus(enum.Enum):
    """Where a request is: queued, in the running batch, or done (and why)."""

    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    """Back in the waiting queue after losing its blocks; recomputed when admitted again."""
    FINISHED_STOPPED = "stop"
    """A stop token or string, decided outside the scheduler."""
    FINISHED_LENGTH = "length"
    """max_tokens or max_model_len reached."""
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        """Whether the request will never be scheduled again."""
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)


@dataclass(eq=False)
class Request:
    """A prompt, the tokens generated so far, and how far the KV cache has caught up.

    One invariant replaces separate prefill and decode phases: ``num_computed_tokens`` (tokens
    whose K/V is in the cache) catches up with ``num_tokens`` (prompt plus output). Each step
    computes some of the tokens in between::

        all_token_ids:  | prompt ...................... | output ........ |
                        | computed      | this step     | later steps    |
                        0   num_computed_tokens                    num_tokens

    A prefill is a step starting at 0, a chunked prefill one that stops short of the prompt's
    end, a prefix-cache hit starts ``num_computed_tokens`` above 0, a decode computes the one
    token sampled last. A step that reaches ``num_tokens`` yields logits for a new token. A
    preempted request drops to 0 and recomputes its prompt and output alike, so it goes on
    exactly where it stopped.

    Only the scheduler changes the bookkeeping fields; change output only through
    ``append_output_token``, ``truncate_output`` and ``replace_last_output_token``, so that
    ``all_token_ids`` and ``token_array()`` stay in step.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParamsLike
    skip_prefix_cache: bool = False
    """Compute every prompt token even when cached (prompt logprobs need each position's logits)."""
    arrival_time: float = field(default_factory=time.monotonic)
    """``time.monotonic()`` when the request arrived; for metrics (order is the add order)."""
    output_token_ids: list[int] = field(default_factory=list, init=False)
    all_token_ids: list[int] = field(init=False)
    """Prompt followed by output, kept as one list so that slicing it costs no concatenation."""
    status: RequestStatus = field(default=RequestStatus.WAITING, init=False)
    num_computed_tokens: int = field(default=0, init=False)
    num_cached_tokens: int = field(default=0, init=False)
    """Tokens found in the prefix cache (or shared by a fork) when first admitted (vLLM's)."""
    num_preemptions: int = field(default=0, init=False)
    block_ids: list[int] = field(default_factory=list, init=False)
    """The block manager's table of this request while it runs (read-only); empty otherwise."""
    draft_token_ids: list[int] = field(default_factory=list, init=False)
    """Tokens a speculative proposer guessed to follow ``all_token_ids``, set before a step;
    the scheduler computes them after the last token (the step verifies them) and clears them."""

    _token_array: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64), init=False, repr=False)
    _num_in_array: int = field(default=0, init=False, repr=False)
    """Leading tokens of ``all_token_ids`` that ``_token_array`` holds."""

    def __post_init__(self) -> None:
        self.prompt_token_ids = list(self.prompt_token_ids)
        self.all_token_ids = list(self.prompt_token_ids)

    def token_array(self) -> np.ndarray:
        """``all_token_ids`` as an int64 NumPy array (a view, valid until the tokens change).

        Kept in step across calls, so each call copies only the tokens added since the last:
        a speculative proposer reads it every step.
        """
        num_tokens = len(self.all_token_ids)
        if num_tokens > len(self._token_array):
            grown = np.empty(max(num_tokens, 2 * len(self._token_array)), dtype=np.int64)
            grown[: self._num_in_array] = self._token_array[: self._num_in_array]
            self._token_array = grown
        self._token_array[self._num_in_array : num_tokens] = self.all_token_ids[self._num_in_array :]
        self._num_in_array = num_tokens
        return self._token_array[:num_tokens]

    @property
    def num_prompt_tokens(self) -> int:
        """Tokens of the prompt."""
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Tokens generated so far."""
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus output tokens."""
        return len(self.all_token_ids)

    @property
    def num_tokens_to_compute(self) -> int:
        """Tokens whose K/V is not in the cache yet."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        """Whether the request will never be scheduled again."""
        return self.status.is_finished

    def append_output_token(self, token_id: int) -> None:
        """Record one generated token."""
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def truncate_output(self, num_output_tokens: int) -> None:
        """Keep the first ``num_output_tokens`` output tokens (a stop among several tokens of one step)."""
        del self.output_token_ids[num_output_tokens:]
        del self.all_token_ids[self.num_prompt_tokens + num_output_tokens :]
        self._num_in_array = min(self._num_in_array, len(self.all_token_ids))

    def replace_last_output_token(self, token_id: int) -> None:
        """Put the sampled token in place of the placeholder appended before it was read."""
        self.output_token_ids[-1] = token_id
        self.all_token_ids[-1] = token_id
        self._num_in_array = min(self._num_in_array, len(self.all_token_ids) - 1)

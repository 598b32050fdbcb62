"""Beam search on top of the engine's generation: vLLM's ``LLM.beam_search`` and its types, and
``BeamSearch``, which ``LLM.beam_search`` and ``AsyncLLM.beam_search`` (the server's) drive.

Each step asks the engine for one token of every live beam, with the ``2 * beam_width`` most
likely next tokens and their log-probabilities under the model's raw distribution. Each beam is
extended by each of those tokens, and each prompt keeps the ``beam_width`` best extensions. A
beam ends on an EOS token (unless ``ignore_eos``), after ``max_tokens`` tokens, or where the
engine would take it as a prompt no longer. The beams of a prompt share the prompt and most of
their tokens, so prefix caching serves most of each step's prefill from the cache.

Beams are ranked by ``cum_logprob / num_generated ** length_penalty``, the EOS counted among the
generated tokens, as transformers ranks finished beams (vLLM divides by the prompt's length too).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

from neuron_llm.inputs import Prompt
from neuron_llm.outputs import Logprob, RequestOutput
from neuron_llm.sampling_params import MAX_LOGPROBS, SamplingParams, is_integral

MAX_BEAM_WIDTH = MAX_LOGPROBS // 2
"""Each step asks for ``2 * beam_width`` logprobs a beam, at most ``MAX_LOGPROBS``."""


@dataclass(frozen=True)
class BeamSearchParams:
    """vLLM's beam search parameters."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    """Only 0: beams are scored by the model's raw log-probabilities, which no temperature changes."""
    length_penalty: float = 1.0
    """The exponent of the generated length that a beam's cumulative logprob is divided by."""
    include_stop_str_in_output: bool = False
    """Keep the EOS token that ended a beam in its tokens."""

    def __post_init__(self) -> None:
        for name, least in (("beam_width", 1), ("max_tokens", 1)):
            value = getattr(self, name)
            if not is_integral(value) or value < least:
                raise ValueError(f"{name}={value!r}: must be an integer >= {least}")
        if self.beam_width > MAX_BEAM_WIDTH:
            raise ValueError(
                f"beam_width={self.beam_width}: at most {MAX_BEAM_WIDTH}, as each step asks for twice as many "
                f"logprobs a beam, at most {MAX_LOGPROBS}"
            )
        if self.temperature != 0:
            raise ValueError(
                f"temperature={self.temperature!r}: beam search scores the model's raw log-probabilities, "
                "which a temperature does not change; leave it 0"
            )
        is_number = isinstance(self.length_penalty, (int, float)) and not isinstance(self.length_penalty, bool)
        if not is_number or not math.isfinite(self.length_penalty):
            raise ValueError(f"length_penalty={self.length_penalty!r}: must be a finite number")
        for name in ("ignore_eos", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r}: must be True or False")


@dataclass
class BeamSearchSequence:
    """One beam: its tokens (the prompt's first, as in vLLM) and the logprobs of each step."""

    tokens: list[int]
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    """Per generated token: the step's most likely tokens, the chosen one among them."""
    cum_logprob: float = 0.0
    text: str | None = None
    """The decoded ``tokens``, prompt and special tokens included (None for a model without a tokenizer)."""
    finish_reason: str | None = None
    """"stop" (an EOS) or "length"."""
    stop_reason: int | None = None
    """The EOS token that ended the beam."""


@dataclass
class BeamSearchOutput:
    """The best ``beam_width`` beams of one prompt, best first."""

    sequences: list[BeamSearchSequence]


class BeamSearch:
    """The beam search of a batch of prompts, a step at a time, for any engine driver: run
    ``beams()``'s tokens through the engine with ``step_params`` and pass the outputs, in
    order, to ``extend``, until ``beams()`` is empty; then read ``results()``.

    A beam longer than ``max_prompt_len`` (the longest prompt the engine takes; the prompts are
    checked against it) ends with "length". Texts are left None.
    """

    def __init__(
        self,
        prompt_ids: Sequence[list[int]],
        params: BeamSearchParams,
        eos_token_ids: Collection[int],
        max_prompt_len: int,
    ) -> None:
        self.params = params
        self.step_params = SamplingParams(
            max_tokens=1,
            temperature=0.0,
            logprobs=2 * params.beam_width,
            ignore_eos=True,
            detokenize=False,
            output_kind="final_only",
        )
        self._eos_token_ids = eos_token_ids
        self._max_prompt_len = max_prompt_len
        self._live = [[BeamSearchSequence(tokens=list(ids))] for ids in prompt_ids]
        self._done: list[list[BeamSearchSequence]] = [[] for _ in prompt_ids]
        self._num_steps = 0

    def beams(self) -> list[BeamSearchSequence]:
        """The beams the next step extends, each prompt's in turn; none once the search is over."""
        if self._num_steps == self.params.max_tokens:
            return []
        return [beam for beams in self._live for beam in beams]

    def extend(self, outputs: Sequence[RequestOutput]) -> None:
        """Take one step's outputs, one per beam of ``beams()``."""
        params, outputs_of_beams = self.params, iter(outputs)
        for index, beams in enumerate(self._live):
            # Candidates are ranked before any is built: a beam's lists are copied only if it is kept.
            candidates = []
            for beam in beams:
                top = next(outputs_of_beams).outputs[0].logprobs[0]
                length = len(beam.logprobs) + 1
                for token_id, logprob in top.items():
                    cum_logprob = beam.cum_logprob + logprob.logprob
                    score = cum_logprob / length**params.length_penalty
                    candidates.append((score, cum_logprob, beam, token_id, top))
            candidates.sort(key=lambda candidate: candidate[0], reverse=True)
            self._live[index], num_kept = [], 0
            for _, cum_logprob, beam, token_id, top in candidates:
                is_eos = token_id in self._eos_token_ids and not params.ignore_eos
                if not is_eos:
                    if num_kept == params.beam_width:
                        continue
                    num_kept += 1
                kept = [token_id] if not is_eos or params.include_stop_str_in_output else []
                child = BeamSearchSequence([*beam.tokens, *kept], [*beam.logprobs, top], cum_logprob)
                if is_eos:
                    child.finish_reason, child.stop_reason = "stop", token_id
                    self._done[index].append(child)
                elif len(child.tokens) > self._max_prompt_len:
                    child.finish_reason = "length"  # no room to extend it
                    self._done[index].append(child)
                else:
                    self._live[index].append(child)
            # Only the best finished beams can still be among the best beam_width.
            self._done[index] = _best(self._done[index], params)
        self._num_steps += 1

    def results(self) -> list[BeamSearchOutput]:
        """Each prompt's best beams; those still live end with "length"."""
        results = []
        for beams, finished in zip(self._live, self._done, strict=True):
            for beam in beams:
                beam.finish_reason = "length"
            results.append(BeamSearchOutput(sequences=_best(finished + beams, self.params)))
        return results


def run_beam_search(
    generate: Callable[[list[Prompt], SamplingParams], list[RequestOutput]],
    prompt_ids: Sequence[list[int]],
    params: BeamSearchParams,
    eos_token_ids: Collection[int],
    max_prompt_len: int,
    progress: Callable[[], None] = lambda: None,
) -> list[BeamSearchOutput]:
    """``BeamSearch`` driven by ``generate``, one batch a step; ``progress`` is called after each step."""
    search = BeamSearch(prompt_ids, params, eos_token_ids, max_prompt_len)
    while beams := search.beams():
        search.extend(generate([{"prompt_token_ids": beam.tokens} for beam in beams], search.step_params))
        progress()
    return search.results()


def _best(beams: list[BeamSearchSequence], params: BeamSearchParams) -> list[BeamSearchSequence]:
    """The ``beam_width`` best of ``beams``, best first."""
    return sorted(beams, key=lambda beam: _score(beam, params.length_penalty), reverse=True)[: params.beam_width]


def _score(beam: BeamSearchSequence, length_penalty: float) -> float:
    return beam.cum_logprob / len(beam.logprobs) ** length_penalty

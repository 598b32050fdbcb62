"""Beam search on top of ``LLM.generate``: vLLM's ``LLM.beam_search`` and its types.

Each step asks the engine for one token of every live beam, with the ``2 * beam_width`` most
likely next tokens and their log-probabilities under the model's raw distribution. Each beam is
extended by each of those tokens, and each prompt keeps the ``beam_width`` best extensions. A
beam ends on an EOS token (unless ``ignore_eos``), after ``max_tokens`` tokens, or at the
model's length limit. The beams of a prompt share the prompt and most of their tokens, so prefix
caching serves most of each step's prefill from the cache.

Beams are ranked by ``cum_logprob / num_generated ** length_penalty``, the EOS counted among the
generated tokens, as transformers ranks finished beams (vLLM divides by the prompt's length too).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace

from neuron_llm.inputs import Prompt
from neuron_llm.outputs import Logprob, RequestOutput
from neuron_llm.sampling_params import MAX_LOGPROBS, SamplingParams

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
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name}={value!r}: must be an integer >= {least}")
        if self.beam_width > MAX_BEAM_WIDTH:
            raise ValueError(
                f"beam_width={self.beam_width}: at most {MAX_BEAM_WIDTH} (each step asks for 2 x beam_width "
                f"logprobs a beam, at most {MAX_LOGPROBS})"
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
    """The decoded ``tokens``, prompt included (None for a model without a tokenizer)."""
    finish_reason: str | None = None
    """"stop" (an EOS) or "length"."""
    stop_reason: int | None = None
    """The EOS token that ended the beam."""


@dataclass
class BeamSearchOutput:
    """The best ``beam_width`` beams of one prompt, best first."""

    sequences: list[BeamSearchSequence]


def beam_search(
    generate: Callable[[list[Prompt], SamplingParams], list[RequestOutput]],
    prompt_ids: Sequence[list[int]],
    params: BeamSearchParams,
    eos_token_ids: Collection[int],
    max_model_len: int,
    progress: Callable[[], None] = lambda: None,
) -> list[BeamSearchOutput]:
    """Beam search from each of ``prompt_ids`` (checked: shorter than ``max_model_len``) by
    ``generate``; ``progress`` is called after each step. Texts are left None."""
    step_params = SamplingParams(
        max_tokens=1, temperature=0.0, logprobs=2 * params.beam_width, ignore_eos=True, detokenize=False
    )
    live = [[BeamSearchSequence(tokens=list(ids))] for ids in prompt_ids]
    done: list[list[BeamSearchSequence]] = [[] for _ in prompt_ids]
    for _ in range(params.max_tokens):
        beams = [beam for beams in live for beam in beams]
        if not beams:
            break
        outputs = generate([{"prompt_token_ids": beam.tokens} for beam in beams], step_params)
        steps = iter(outputs)
        for index, beams in enumerate(live):
            extended = []
            for beam in beams:
                top = next(steps).outputs[0].logprobs[0]
                for token_id, logprob in top.items():
                    child = _extend(beam, token_id, top, logprob.logprob)
                    if token_id in eos_token_ids and not params.ignore_eos:
                        if not params.include_stop_str_in_output:
                            child.tokens.pop()
                        done[index].append(replace(child, finish_reason="stop", stop_reason=token_id))
                    else:
                        extended.append(child)
            extended.sort(key=lambda beam: _score(beam, params.length_penalty), reverse=True)
            live[index] = []
            for beam in extended[: params.beam_width]:
                # A beam the model has no room to extend ends here.
                (done[index] if len(beam.tokens) >= max_model_len else live[index]).append(beam)
        progress()
    results = []
    for beams, finished in zip(live, done, strict=True):
        candidates = finished + beams
        for beam in candidates:
            beam.finish_reason = beam.finish_reason or "length"
        candidates.sort(key=lambda beam: _score(beam, params.length_penalty), reverse=True)
        results.append(BeamSearchOutput(sequences=candidates[: params.beam_width]))
    return results


def _extend(beam: BeamSearchSequence, token_id: int, top: dict[int, Logprob], logprob: float) -> BeamSearchSequence:
    return BeamSearchSequence(
        tokens=[*beam.tokens, token_id], logprobs=[*beam.logprobs, top], cum_logprob=beam.cum_logprob + logprob
    )


def _score(beam: BeamSearchSequence, length_penalty: float) -> float:
    return beam.cum_logprob / len(beam.logprobs) ** length_penalty

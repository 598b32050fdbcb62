"""The sampling features that change a step's graph on the XLA device, and dummy rows that use them.

A static sampling batch (``SamplingBatch.build_static``) has one graph for any mix of greedy,
random and seeded rows; each of ``SAMPLING_FEATURES`` that some row of a step uses adds inputs
or outputs, so a bucket has a graph per combination of them. Warm-up compiles the
combinations an engine is configured for, from one dummy row that uses them.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from neuron_llm.config import SAMPLING_FEATURES
from neuron_llm.sample.sampler import RowState
from neuron_llm.sampling_params import SamplingParams

PROMPT_LOGPROBS = "prompt_logprobs"
"""The one feature of a step rather than of a row: logits rows for prompt positions."""


def feature_sets(features: Iterable[str]) -> list[tuple[str, ...]]:
    """Every non-empty combination of ``features``, each sorted: the graphs beyond the plain one."""
    chosen = sorted(set(features))
    return [combo for size in range(1, len(chosen) + 1) for combo in itertools.combinations(chosen, size)]


def feature_row(features: Iterable[str]) -> RowState:
    """A greedy row whose sampling uses each row feature in ``features`` (its values are dummies:
    only which parts the graph holds matters)."""
    chosen = set(features)
    assert chosen <= set(SAMPLING_FEATURES), chosen
    params = SamplingParams(
        temperature=0.0,
        logit_bias={0: 1.0} if "logit_bias" in chosen else None,
        repetition_penalty=1.1 if "penalties" in chosen else 1.0,
        # Token 0 ends the sequence, so the mask holds it before min_tokens whatever the EOS ids.
        min_tokens=1 if "min_tokens" in chosen else 0,
        stop_token_ids=[0] if "min_tokens" in chosen else None,
        logprobs=1 if "logprobs" in chosen else None,
    )
    return RowState(params, (), ())


def dummy_logits_indices(num_seqs: int, num_sampling_rows: int, features: Iterable[str]) -> list[int]:
    """The logits rows of a dummy step: its ``num_sampling_rows`` padded to the bucket's
    ``num_seqs`` (as the runner pads them), then, with ``prompt_logprobs``, one prompt row."""
    return [0] * max(num_sampling_rows, num_seqs) + [0] * (PROMPT_LOGPROBS in features)


def features_of(params: SamplingParams) -> set[str]:
    """The features a request of ``params`` makes its steps' graphs hold."""
    used = {
        "logit_bias": params.has_token_bias,
        "logprobs": params.logprobs is not None,
        "min_tokens": params.min_tokens > 0,
        "penalties": params.has_penalties,
        PROMPT_LOGPROBS: params.prompt_logprobs is not None,
    }
    return {name for name, is_used in used.items() if is_used}

from __future__ import annotations

import logging
import math
import re

import numpy as np
import pytest

from neuron_llm.sampling_params import (
    MAX_BAD_WORD_CHARS,
    MAX_BAD_WORDS,
    MAX_LOGIT_BIAS,
    MAX_LOGPROBS,
    MAX_N,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    MIN_TEMPERATURE,
    SamplingParams,
)


def test_defaults_match_vllm() -> None:
    params = SamplingParams()
    assert (params.n, params.temperature, params.top_p, params.top_k, params.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (params.seed, params.max_tokens, params.min_tokens) == (None, 16, 0)
    assert params.stop == [] and params.stop_token_ids == [] and params.ignore_eos is False
    assert params.logprobs is None and params.prompt_logprobs is None
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (0.0, 0.0, 1.0)
    assert not params.is_greedy


@pytest.mark.parametrize(
    ("stop", "expected"),
    [(None, []), ("###", ["###"]), (["a", "bc"], ["a", "bc"]), (("x",), ["x"])],
)
def test_stop_is_normalized_to_a_list(stop: object, expected: list[str]) -> None:
    assert SamplingParams(stop=stop).stop == expected


def test_normalizations() -> None:
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(stop_token_ids=(5, 7, 5)).stop_token_ids == [5, 7]
    params = SamplingParams(temperature=2, top_p=1, repetition_penalty=2)
    assert isinstance(params.temperature, float) and isinstance(params.top_p, float)
    assert isinstance(params.repetition_penalty, float)
    assert SamplingParams(temperature=0).is_greedy
    assert SamplingParams(max_tokens=None).max_tokens is None
    # NumPy's numbers are taken, and stored as Python ones.
    params = SamplingParams(max_tokens=np.int64(32), temperature=np.float32(0.5), top_k=np.int32(5), seed=np.int64(3))
    assert (params.max_tokens, params.temperature, params.top_k, params.seed) == (32, 0.5, 5, 3)
    assert type(params.max_tokens) is int and type(params.temperature) is float and type(params.top_k) is int
    assert type(SamplingParams(stop_token_ids=[np.int64(9)]).stop_token_ids[0]) is int


@pytest.mark.parametrize("temperature", [1e-9, 1e-5, 1e-3, 0.0099])
def test_a_temperature_under_a_hundredth_is_raised_to_it_as_in_vllm(
    temperature: float, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="neuron_llm.sampling_params"):
        params = SamplingParams(temperature=temperature)
    assert params.temperature == MIN_TEMPERATURE == 0.01 and not params.is_greedy
    assert [record.levelno for record in caplog.records] == [logging.WARNING]
    assert SamplingParams(temperature=0.01).temperature == 0.01 and SamplingParams(temperature=0.0).is_greedy


def test_the_largest_counts_are_taken() -> None:
    params = SamplingParams(n=MAX_N, stop=["s" * MAX_STOP_STRING_CHARS] * MAX_STOP_STRINGS)
    assert params.n == MAX_N and len(params.stop) == MAX_STOP_STRINGS


def test_seed_minus_one_is_no_seed_as_in_vllm() -> None:
    assert SamplingParams(seed=-1).seed is None
    assert SamplingParams(seed=-2).seed == -2
    assert SamplingParams(seed=2**64 - 1).seed == 2**64 - 1


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n", 0),
        ("n", 1.5),
        ("n", True),
        ("n", MAX_N + 1),
        ("n", 10**30),
        ("temperature", -1.0),
        ("temperature", "hot"),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("temperature", 10**400),
        ("top_p", 10**400),
        ("presence_penalty", -(10**400)),
        ("n", np.bool_(True)),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_p", "all"),
        ("top_k", -2),
        ("top_k", 2.5),
        ("min_p", -0.1),
        ("min_p", 1.5),
        ("seed", 1.5),
        ("seed", "42"),
        ("seed", 2**64),  # folded onto 64 bits it would be seed 0's stream
        ("seed", -(2**63) - 1),
        ("max_tokens", 0),
        ("max_tokens", 3.0),
        ("min_tokens", -1),
        ("stop", ""),
        ("stop", ["ok", ""]),
        ("stop", 42),
        ("stop", ["ok", 3]),
        ("stop", ["s"] * (MAX_STOP_STRINGS + 1)),
        ("stop", ["ok", "s" * (MAX_STOP_STRING_CHARS + 1)]),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", ["eos"]),
        ("stop_token_ids", 7),
        ("stop_token_ids", list(range(MAX_STOP_TOKEN_IDS + 1))),
        ("ignore_eos", "yes"),
        ("include_stop_str_in_output", 1),
        ("skip_special_tokens", "no"),
        ("logprobs", -1),
        ("logprobs", MAX_LOGPROBS + 1),
        ("logprobs", 2.0),
        ("prompt_logprobs", -1),
        ("prompt_logprobs", MAX_LOGPROBS + 1),
        ("presence_penalty", 2.5),
        ("presence_penalty", -2.5),
        ("frequency_penalty", 2.01),
        ("frequency_penalty", -3),
        ("frequency_penalty", None),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("repetition_penalty", math.inf),
        ("output_kind", "deltas"),
        ("logit_bias", [(1, 2.0)]),
        ("logit_bias", {-1: 2.0}),
        ("logit_bias", {"7": 2.0}),
        ("logit_bias", {1.5: 2.0}),
        ("logit_bias", {1: 100.5}),
        ("logit_bias", {1: math.nan}),
        ("logit_bias", {1: "up"}),
        ("allowed_token_ids", []),
        ("allowed_token_ids", [3, -1]),
        ("allowed_token_ids", [1.0]),
        ("allowed_token_ids", 5),
        ("bad_words", "word"),
        ("bad_words", ["ok", ""]),
        ("bad_words", ["ok", " \n"]),
        ("bad_words", [3]),
        ("bad_words", ["w"] * (MAX_BAD_WORDS + 1)),
        ("bad_words", ["ok", "w" * (MAX_BAD_WORD_CHARS + 1)]),
    ],
)
def test_invalid_value_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"^{field}="):
        SamplingParams(**{field: value})


def test_logit_bias_is_stored_as_ints_to_floats_and_none_when_empty() -> None:
    assert SamplingParams(logit_bias={np.int64(3): 1, 4: -100, 5: 100}).logit_bias == {3: 1.0, 4: -100.0, 5: 100.0}
    assert all(type(v) is float for v in SamplingParams(logit_bias={3: 1}).logit_bias.values())
    assert SamplingParams(logit_bias={}).logit_bias is None
    assert len(SamplingParams(logit_bias=dict.fromkeys(range(MAX_LOGIT_BIAS), 1.0)).logit_bias) == MAX_LOGIT_BIAS
    with pytest.raises(ValueError, match=rf"^logit_bias=<{MAX_LOGIT_BIAS + 1} token ids>: at most {MAX_LOGIT_BIAS}"):
        SamplingParams(logit_bias=dict.fromkeys(range(MAX_LOGIT_BIAS + 1), 1.0))


def test_allowed_token_ids_and_bad_words_are_stored_normalized() -> None:
    params = SamplingParams(allowed_token_ids=(9, np.int64(2), 9), bad_words=("no", " never"))
    assert params.allowed_token_ids == [2, 9] and type(params.allowed_token_ids[0]) is int
    assert params.bad_words == ["no", " never"] and params.has_token_bias
    assert SamplingParams(bad_words=[]).bad_words is None and not SamplingParams(bad_words=[]).has_token_bias


def test_min_tokens_above_max_tokens() -> None:
    with pytest.raises(ValueError, match=r"^min_tokens=5: must be <= max_tokens=4"):
        SamplingParams(min_tokens=5, max_tokens=4)
    assert SamplingParams(min_tokens=100, max_tokens=None).min_tokens == 100


def test_error_message_shows_the_value() -> None:
    with pytest.raises(ValueError, match=r"^temperature=-1\.0: must be >= 0$"):
        SamplingParams(temperature=-1.0)


@pytest.mark.parametrize(
    ("name", "value", "why"),
    [
        # In float32 1e39 is inf, and 1e-50 is 0: a banned token's -inf logit becomes NaN, which wins.
        ("temperature", 1e39, r"must be <= 1e\+06"),
        ("repetition_penalty", 1e-50, r"must be in \[1e-06, 1e\+06\]"),
        ("repetition_penalty", 1e7, r"must be in \[1e-06, 1e\+06\]"),
    ],
)
def test_values_whose_float32_arithmetic_breaks_the_constraints_are_refused(name: str, value: float, why: str) -> None:
    with pytest.raises(ValueError, match=rf"^{name}={re.escape(repr(value))}: {why}$"):
        SamplingParams(**{name: value})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"top_p": 1e-6},
        {"top_k": 1},
        {"min_p": 1.0},
        {"logprobs": 0},
        {"logprobs": MAX_LOGPROBS},
        {"presence_penalty": -2.0, "frequency_penalty": 2.0},
        {"repetition_penalty": 0.5},
        {"repetition_penalty": 1e-6},
        {"repetition_penalty": 1e6},
        {"temperature": 1e6},
        {"seed": -3},
        {"min_tokens": 16},
    ],
)
def test_boundary_values_are_accepted(kwargs: dict[str, object]) -> None:
    params = SamplingParams(**kwargs)
    for name, value in kwargs.items():
        assert getattr(params, name) == value

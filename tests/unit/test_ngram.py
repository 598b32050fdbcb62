"""N-gram prompt lookup against a brute-force reference of its rule, and the token array it reads."""

from __future__ import annotations

import random

import pytest

from neuron_llm.config import SpeculativeConfig
from neuron_llm.engine import Request
from neuron_llm.engine.speculative import NgramProposer
from neuron_llm.sampling_params import SamplingParams


def reference(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1):
        suffix = tokens[-n:]
        starts = [i for i in range(len(tokens) - n) if tokens[i : i + n] == suffix]
        if starts:
            whole = [i for i in starts if i + n + k <= len(tokens)]
            start = (whole or starts)[-1] + n
            return tokens[start : start + k]
    return []


def proposer(k: int, min_n: int = 1, max_n: int = 4) -> NgramProposer:
    return NgramProposer(SpeculativeConfig(num_speculative_tokens=k, prompt_lookup_min=min_n, prompt_lookup_max=max_n))


def test_the_longest_suffix_wins_and_its_latest_occurrence() -> None:
    # "2 3" occurs twice; "1 2 3" once, followed by 4 5 6.
    assert proposer(3).propose([1, 2, 3, 4, 5, 6, 9, 2, 3, 7, 7, 1, 2, 3]) == [4, 5, 6]
    assert proposer(2).propose([2, 3, 8, 8, 2, 3, 9, 9, 2, 3]) == [9, 9]


def test_a_short_period_proposes_a_whole_run() -> None:
    assert proposer(4).propose([7] * 10) == [7, 7, 7, 7]
    assert proposer(4).propose([1, 2] * 6) == [1, 2, 1, 2]


def test_nothing_is_proposed_without_a_long_enough_match() -> None:
    assert proposer(3).propose([5]) == []
    assert proposer(3).propose([1, 2, 3, 4]) == []
    assert proposer(3, min_n=2).propose([1, 2, 9, 2]) == []
    assert proposer(3, min_n=1).propose([1, 2, 9, 2]) == [9, 2]


@pytest.mark.parametrize("seed", range(4))
def test_random_sequences_match_the_reference(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(500):
        tokens = [rng.randrange(4) for _ in range(rng.randint(1, 30))]
        k, min_n = rng.randint(1, 5), rng.randint(1, 3)
        max_n = rng.randint(min_n, 5)
        assert proposer(k, min_n, max_n).propose(tokens) == reference(tokens, k, min_n, max_n), tokens


@pytest.mark.parametrize("seed", range(3))
def test_a_requests_token_array_follows_its_tokens(seed: int) -> None:
    # The engine proposes from this array each step; it is copied incrementally, so every
    # way the tokens change must reach it.
    rng = random.Random(seed)
    request = Request("r", [rng.randrange(100) for _ in range(rng.randint(1, 5))], SamplingParams(max_tokens=500))
    for _ in range(300):
        action = rng.random()
        if action < 0.6:
            request.append_output_token(rng.randrange(100))
        elif action < 0.8 and request.num_output_tokens:
            request.truncate_output(rng.randrange(request.num_output_tokens))
        elif request.num_output_tokens:
            request.replace_last_output_token(rng.randrange(100))
        if rng.random() < 0.5:
            assert request.token_array().tolist() == request.all_token_ids
    assert request.token_array().tolist() == request.all_token_ids
    # A proposal from the array is the one from the list.
    assert proposer(3).propose(request.token_array()) == proposer(3).propose(request.all_token_ids)

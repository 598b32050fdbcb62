"""Continuous batching changes nothing about a request's output: batch, chunk and preempt invariance."""

from __future__ import annotations

import random

import pytest

from neuron_llm.sampling_params import SamplingParams
from tests.engine.conftest import all_blocks_free, make_llm, random_prompts, run_all

NUM_PROMPTS = 32
GREEDY = SamplingParams(temperature=0.0, max_tokens=12)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return random_prompts(NUM_PROMPTS, seed=1)


@pytest.fixture(scope="module")
def solo_outputs(tiny_model_dir, prompts) -> list[list[int]]:
    llm = make_llm(tiny_model_dir, enable_prefix_caching=False)
    return [llm.generate({"prompt_token_ids": p}, GREEDY)[0].outputs[0].token_ids for p in prompts]


def _random_arrivals(prompts: list[list[int]], params: SamplingParams, seed: int) -> dict:
    rng = random.Random(seed)
    arrivals: dict[int, list] = {}
    for index, prompt in enumerate(prompts):
        arrivals.setdefault(rng.randrange(0, 20), []).append((str(index), prompt, params))
    return arrivals


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({}, id="default-budget"),
        pytest.param({"max_num_batched_tokens": 16}, id="chunked-prefill-budget-16"),
    ],
)
def test_batched_greedy_equals_solo(tiny_model_dir, prompts, solo_outputs, options) -> None:
    llm = make_llm(tiny_model_dir, **options)
    finished = run_all(llm, _random_arrivals(prompts, GREEDY, seed=2))
    assert sorted(finished, key=int) == [str(i) for i in range(NUM_PROMPTS)]
    for index, expected in enumerate(solo_outputs):
        assert finished[str(index)].outputs[0].token_ids == expected, f"prompt {index}"
    assert all_blocks_free(llm)


def test_preemption_keeps_outputs(tiny_model_dir, prompts, solo_outputs) -> None:
    # 24 usable blocks of 4 tokens hold two or three of these requests at once.
    llm = make_llm(tiny_model_dir, num_kv_blocks=25, max_num_batched_tokens=32)
    finished = run_all(llm, _random_arrivals(prompts, GREEDY, seed=3))
    assert llm.engine.scheduler.num_preemptions > 0
    for index, expected in enumerate(solo_outputs):
        assert finished[str(index)].outputs[0].token_ids == expected, f"prompt {index}"
    assert all_blocks_free(llm)

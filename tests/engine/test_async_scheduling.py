"""Async scheduling (each step launched before the previous one's tokens are read) changes no output."""

from __future__ import annotations

import random

import pytest
import torch

from neuron_llm.sampling_params import SamplingParams
from neuron_llm.worker import fill_placeholders, placeholder
from tests.engine.conftest import all_blocks_free, assert_same_outputs, make_llm, random_prompts, run_all

KINDS = {
    "greedy": SamplingParams(temperature=0.0, max_tokens=12),
    "seeded": SamplingParams(temperature=0.8, top_k=40, seed=7, max_tokens=10),
    "n=2": SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=9, output_kind="delta"),
    "logprobs": SamplingParams(temperature=0.0, max_tokens=8, logprobs=3, prompt_logprobs=2),
    "min_tokens": SamplingParams(temperature=0.0, max_tokens=10, min_tokens=6, stop_token_ids=[0, 1, 2, 3, 4]),
    "final_only": SamplingParams(temperature=0.0, max_tokens=11, output_kind="final_only"),
}
PENALIZED = SamplingParams(temperature=0.0, max_tokens=10, repetition_penalty=1.3, frequency_penalty=0.5)


def test_placeholders_take_the_previous_steps_tokens() -> None:
    sampled = torch.tensor([11, 22, 33])
    ids = torch.tensor([5, placeholder(2), 0, placeholder(0), 7])
    assert fill_placeholders(ids, sampled).tolist() == [5, 33, 0, 11, 7]


def _arrivals(kinds: dict[str, SamplingParams], seed: int, probe: list[int] | None = None, written=()) -> dict:
    """Four requests of each kind at random steps; with ``probe``, requests on that prompt
    that stop on the tokens greedy decoding ``written`` for it, one of them after min_tokens."""
    rng = random.Random(seed)
    prompts = random_prompts(4 * len(kinds), seed=seed)
    arrivals: dict[int, list] = {}
    for index, (name, params) in enumerate((name, params) for name in kinds for params in [kinds[name]] * 4):
        arrivals.setdefault(rng.randrange(0, 12), []).append((f"{name}-{index}", prompts[index], params))
    if probe is not None:
        stops = [SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=[token]) for token in written[2:5]]
        stops.append(SamplingParams(temperature=0.0, max_tokens=20, min_tokens=4, stop_token_ids=[written[1]]))
        for index, params in enumerate(stops):
            arrivals.setdefault(rng.randrange(0, 12), []).append((f"stop-{index}", probe, params))
    return arrivals


def _outputs(llm, arrivals: dict) -> dict:
    finished = run_all(llm, dict(arrivals))
    assert all_blocks_free(llm)
    return finished


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({}, id="default"),
        pytest.param({"max_num_batched_tokens": 16}, id="chunked-prefill"),
        pytest.param({"num_kv_blocks": 25, "max_num_batched_tokens": 32}, id="preempting"),
        pytest.param({"enable_prefix_caching": True}, id="prefix-cache"),
    ],
)
def test_async_outputs_equal_sync_outputs(tiny_model_dir, options) -> None:
    probe = random_prompts(1, seed=40)[0]
    written = make_llm(tiny_model_dir).generate({"prompt_token_ids": probe}, KINDS["greedy"])[0].outputs[0].token_ids
    arrivals = _arrivals(KINDS, seed=41, probe=probe, written=written)
    expected = _outputs(make_llm(tiny_model_dir, async_scheduling=False, **options), arrivals)
    assert all(expected[f"stop-{i}"].outputs[0].finish_reason == "stop" for i in range(4))
    assert len(expected["stop-3"].outputs[0].token_ids) >= 4  # min_tokens held its stop token back
    llm = make_llm(tiny_model_dir, async_scheduling=True, **options)
    ours = _outputs(llm, arrivals)
    assert_same_outputs(ours, expected)
    if "num_kv_blocks" in options:
        assert llm.engine.scheduler.num_preemptions > 0


def test_async_steps_report_one_step_late(tiny_model_dir) -> None:
    llm = make_llm(tiny_model_dir, async_scheduling=True)
    prompt = random_prompts(1, seed=42)[0]
    llm.engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=3), request_id="r")
    # Prefill, then two decodes: each step returns the tokens of the step before it.
    assert llm.engine.step() == []
    counts = [[len(o.outputs[0].token_ids) for o in llm.engine.step()] for _ in range(3)]
    assert counts == [[1], [2], [3]]
    assert not llm.engine.has_unfinished_requests()


def test_penalties_wait_for_each_steps_tokens(tiny_model_dir) -> None:
    arrivals = _arrivals({"greedy": KINDS["greedy"], "penalized": PENALIZED}, seed=43)
    expected = _outputs(make_llm(tiny_model_dir, async_scheduling=False), arrivals)
    ours = _outputs(make_llm(tiny_model_dir, async_scheduling=True), arrivals)
    assert_same_outputs(ours, expected)


def test_abort_while_a_step_is_in_flight(tiny_model_dir) -> None:
    llm = make_llm(tiny_model_dir, async_scheduling=True)
    prompts = random_prompts(2, seed=44)
    llm.engine.add_request(prompts[0], SamplingParams(temperature=0.0, max_tokens=6), request_id="kept")
    llm.engine.add_request(prompts[1], SamplingParams(temperature=0.0, max_tokens=6), request_id="aborted")
    llm.engine.step()
    llm.engine.step()
    assert llm.engine.abort("aborted")
    finished = run_all(llm, {})
    assert list(finished) == ["kept"]
    alone = make_llm(tiny_model_dir, async_scheduling=False)
    expected = alone.generate({"prompt_token_ids": prompts[0]}, SamplingParams(temperature=0.0, max_tokens=6))[0]
    assert finished["kept"].outputs[0].token_ids == expected.outputs[0].token_ids
    assert all_blocks_free(llm)


def test_a_reused_request_id_never_takes_the_aborted_requests_token(tiny_model_dir) -> None:
    old, new = random_prompts(2, seed=45)
    greedy = SamplingParams(temperature=0.0, max_tokens=5)
    sync = make_llm(tiny_model_dir, async_scheduling=False)
    in_flight_token = sync.generate({"prompt_token_ids": old}, greedy)[0].outputs[0].token_ids[1]
    # The new request stops on the token the aborted one's step in flight produces.
    params = SamplingParams(temperature=0.0, max_tokens=5, stop_token_ids=[in_flight_token])
    expected = sync.generate({"prompt_token_ids": new}, params)[0].outputs[0]
    llm = make_llm(tiny_model_dir, async_scheduling=True)
    llm.engine.add_request(old, greedy, request_id="x")
    llm.engine.step()
    llm.engine.step()  # the old request's first decode is in flight
    assert llm.engine.abort("x")
    llm.engine.add_request(new, params, request_id="x")
    got = run_all(llm, {})["x"].outputs[0]
    assert (got.token_ids, got.finish_reason) == (expected.token_ids, expected.finish_reason)

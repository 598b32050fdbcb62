"""Speculative decoding changes no greedy output, whatever the proposals, and keeps the engine's
bookkeeping (blocks, prefix cache, preemption, stops, length limits) right."""

from __future__ import annotations

import random

import pytest

from neuron_llm.config import SpeculativeConfig
from neuron_llm.sampling_params import SamplingParams
from tests.engine.conftest import (
    OracleProposer,
    all_blocks_free,
    assert_same_outputs,
    make_llm,
    random_prompts,
    run_all,
)

GREEDY_KINDS = {
    "greedy": SamplingParams(temperature=0.0, max_tokens=14),
    "logprobs": SamplingParams(temperature=0.0, max_tokens=9, logprobs=3, prompt_logprobs=2, output_kind="delta"),
    "min_tokens": SamplingParams(temperature=0.0, max_tokens=10, min_tokens=6, stop_token_ids=[0, 1, 2, 3, 4]),
    "penalized": SamplingParams(temperature=0.0, max_tokens=10, repetition_penalty=1.3, frequency_penalty=0.5),
    "n=2": SamplingParams(n=2, temperature=0.0, max_tokens=8),
    "final_only": SamplingParams(temperature=0.0, max_tokens=11, output_kind="final_only"),
}
UNSTOPPED = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)


def _arrivals(seed: int) -> tuple[dict, list[int]]:
    """Two requests of each kind at random steps, and four on one probe prompt that stop on
    tokens greedy decoding writes for it (one after min_tokens)."""
    rng = random.Random(seed)
    prompts = random_prompts(2 * len(GREEDY_KINDS) + 1, seed=seed)
    probe = prompts.pop()
    arrivals: dict[int, list] = {}
    for index, (name, params) in enumerate((n, p) for n in GREEDY_KINDS for p in [GREEDY_KINDS[n]] * 2):
        arrivals.setdefault(rng.randrange(0, 8), []).append((f"{name}-{index}", prompts[index], params))
    return arrivals, probe


def _with_stops(arrivals: dict, probe: list[int], written: list[int]) -> dict:
    arrivals = {step: list(entries) for step, entries in arrivals.items()}
    stops = [SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=[token]) for token in written[3:6]]
    stops.append(SamplingParams(temperature=0.0, max_tokens=20, min_tokens=5, stop_token_ids=[written[1]]))
    for index, params in enumerate(stops):
        arrivals.setdefault(index, []).append((f"stop-{index}", probe, params))
    return arrivals


def _continuations(expected: dict, arrivals: dict, probe: list[int], written: list[int]) -> dict:
    """Each prompt's greedy continuation: its request's output, and for the probe prompt
    (whose requests stop) the continuation written without a stop."""
    continuations = {
        tuple(prompt): expected[request_id].outputs[0].token_ids
        for entries in arrivals.values()
        for request_id, prompt, _ in entries
    }
    continuations[tuple(probe)] = written
    return continuations


@pytest.mark.parametrize("quality", ["right", "wrong", "mixed"])
@pytest.mark.parametrize(
    "options",
    [
        pytest.param({}, id="default"),
        pytest.param({"max_num_batched_tokens": 16}, id="small-budget"),
        pytest.param({"num_kv_blocks": 25, "max_num_batched_tokens": 32}, id="preempting"),
        pytest.param({"enable_prefix_caching": False}, id="no-prefix-cache"),
    ],
)
def test_greedy_outputs_equal_plain_decodings(tiny_model_dir, quality, options) -> None:
    arrivals, probe = _arrivals(seed=50)
    written = make_llm(tiny_model_dir).generate({"prompt_token_ids": probe}, UNSTOPPED)[0].outputs[0].token_ids
    arrivals = _with_stops(arrivals, probe, written)
    expected = run_all(make_llm(tiny_model_dir, **options), dict(arrivals))
    # Stops inside a step's run of kept proposals, and on its added token.
    assert all(expected[f"stop-{i}"].outputs[0].finish_reason == "stop" for i in range(3))

    llm = make_llm(tiny_model_dir, speculative_config={"num_speculative_tokens": 3}, **options)
    oracle = OracleProposer(_continuations(expected, arrivals, probe, written), quality, k=3)
    llm.engine.proposer = oracle
    ours = run_all(llm, dict(arrivals))
    assert_same_outputs(ours, expected)
    assert all_blocks_free(llm)
    stats = llm.engine.stats()
    # A small budget verifies fewer: proposals leave the budget of each step's admission.
    assert stats.num_draft_tokens > (25 if options.get("max_num_batched_tokens") == 16 else 50)
    rate = stats.num_accepted_tokens / stats.num_draft_tokens
    # "right" loses only those past a stop and those of the probe's min_tokens request: its
    # stop token, held back, changes its continuation (a third of all proposals).
    assert {"right": rate > 0.6, "wrong": rate == 0, "mixed": 0.15 < rate < 0.5}[quality], rate
    if "num_kv_blocks" in options:
        assert llm.engine.scheduler.num_preemptions > 0


def test_prefix_cache_hits_after_speculation_give_the_same_outputs(tiny_model_dir) -> None:
    """Blocks holding refused proposals' K/V must never be published to the prefix cache."""
    prompts = random_prompts(6, seed=51, min_len=20, max_len=30)
    params = SamplingParams(temperature=0.0, max_tokens=24)
    plain = make_llm(tiny_model_dir)
    expected = [o.outputs[0].token_ids for o in plain.generate([{"prompt_token_ids": p} for p in prompts], params)]
    llm = make_llm(tiny_model_dir, speculative_config={"num_speculative_tokens": 4})
    continuations = {tuple(p): out for p, out in zip(prompts, expected)}
    llm.engine.proposer = OracleProposer(continuations, "mixed", k=4)
    first = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]
    # Again, each prompt extended by its output: the cached blocks now cover prompt and output.
    extended = [p + out[:16] for p, out in zip(prompts, expected)]
    again = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in extended], params)]
    want = [o.outputs[0].token_ids for o in plain.generate([{"prompt_token_ids": p} for p in extended], params)]
    assert first == expected
    assert again == want
    assert llm.engine.scheduler.block_manager.prefix_hit_rate > 0


def test_ngram_proposals_are_verified_end_to_end(tiny_model_dir) -> None:
    """The built-in proposer on prompts that repeat themselves: proposals are made and the
    output is still plain greedy decoding's."""
    base = random_prompts(4, seed=52, min_len=6, max_len=10)
    prompts = [p * 4 for p in base]
    params = SamplingParams(temperature=0.0, max_tokens=30)
    expected = make_llm(tiny_model_dir).generate([{"prompt_token_ids": p} for p in prompts], params)
    llm = make_llm(tiny_model_dir, speculative_config={"num_speculative_tokens": 4, "prompt_lookup_max": 3})
    proposals = []
    proposer = llm.engine.proposer

    class Recording:
        def propose(self, token_ids):
            proposals.append(proposer.propose(token_ids))
            return proposals[-1]

    llm.engine.proposer = Recording()
    ours = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    assert [o.outputs[0].token_ids for o in ours] == [o.outputs[0].token_ids for o in expected]
    assert sum(map(len, proposals)) > 0


def test_seeded_sampling_is_not_speculated_and_draws_what_plain_decoding_draws(tiny_model_dir) -> None:
    """A seed fixes a request's tokens whatever the batch: seeded sampled requests get no
    proposals, and steps that verify their neighbours' proposals take from their generators
    exactly what plain steps take. Unseeded sampled requests are speculated."""
    prompts = random_prompts(6, seed=53)
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=11, max_tokens=16)
    unseeded = SamplingParams(temperature=0.9, max_tokens=16)
    greedy = SamplingParams(temperature=0.0, max_tokens=16)
    params = [seeded, seeded, greedy, greedy, unseeded, unseeded]
    arrivals = {0: [(f"r{i}", prompt, p) for i, (prompt, p) in enumerate(zip(prompts, params))]}
    expected = run_all(make_llm(tiny_model_dir), dict(arrivals))
    plain = make_llm(tiny_model_dir)
    continuations = {
        tuple(p): plain.generate({"prompt_token_ids": p}, UNSTOPPED)[0].outputs[0].token_ids for p in prompts
    }
    llm = make_llm(tiny_model_dir, speculative_config={"num_speculative_tokens": 3})
    oracle = OracleProposer(continuations, "mixed", k=3)
    proposed_to = []

    class Recording:
        def propose(self, token_ids):
            proposed_to.append(next(i for i, p in enumerate(prompts) if list(token_ids[: len(p)]) == p))
            return oracle.propose(token_ids)

    llm.engine.proposer = Recording()
    ours = run_all(llm, dict(arrivals))
    for request_id in ("r0", "r1", "r2", "r3"):
        assert ours[request_id].outputs[0].token_ids == expected[request_id].outputs[0].token_ids
    assert set(proposed_to) == {2, 3, 4, 5}
    assert llm.engine.stats().num_accepted_tokens > 0


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"method": "eagle", "num_speculative_tokens": 2}, "method"),
        ({"num_speculative_tokens": 0}, "num_speculative_tokens"),
        ({}, "needs num_speculative_tokens"),
        ({"num_speculative_tokens": 2, "lookahead": 3}, "unknown key"),
        ({"num_speculative_tokens": 2, "prompt_lookup_min": 3, "prompt_lookup_max": 2}, "prompt_lookup_min"),
        ("{not json", "not JSON"),
        ("[1, 2]", "JSON object"),
    ],
)
def test_bad_speculative_configs_are_named(value, message) -> None:
    with pytest.raises(ValueError, match=message):
        SpeculativeConfig.parse(value)


def test_speculation_refuses_async_scheduling(tiny_model_dir) -> None:
    with pytest.raises(ValueError, match="exclude each other"):
        make_llm(tiny_model_dir, speculative_config='{"num_speculative_tokens": 2}', async_scheduling=True)


def test_speculation_refuses_a_budget_of_one_token(tiny_model_dir) -> None:
    # No step could verify a proposal; the XLA device's warm-up failed on it with a bucket error.
    with pytest.raises(ValueError, match="max_num_batched_tokens=1: speculative decoding verifies"):
        make_llm(tiny_model_dir, speculative_config='{"num_speculative_tokens": 1}', max_num_batched_tokens=1)

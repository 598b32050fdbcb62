"""Prefix caching, seeded sampling, n > 1, logprobs, aborts and bad requests in the engine."""

from __future__ import annotations

import functools
import json
import shutil
import signal
from dataclasses import replace

import pytest
import torch

from neuron_llm.engine import llm_engine
from neuron_llm.outputs import RequestOutput
from neuron_llm.sampling_params import SamplingParams, StructuredOutputsParams
from neuron_llm.worker import StepInput
from tests.engine.conftest import VOCAB_SIZE, FakeBar, all_blocks_free, make_llm, random_prompts, run_all, same_logprobs
from tests.tokenizer_kinds import byte_level_bpe

GREEDY = SamplingParams(temperature=0.0, max_tokens=10)


def test_prefix_cache_hit_gives_same_output(tiny_model_dir) -> None:
    prefix = random_prompts(1, seed=5, min_len=40, max_len=40)[0]
    first, second = prefix + [1, 2, 3], prefix + [7, 8]
    outputs = {}
    for caching in (False, True):
        llm = make_llm(tiny_model_dir, enable_prefix_caching=caching)
        llm.generate({"prompt_token_ids": first}, GREEDY)
        manager = llm.engine.scheduler.block_manager
        hits_before = manager.num_prefix_hit_tokens if caching else 0
        [output] = llm.generate({"prompt_token_ids": second}, GREEDY)
        outputs[caching] = output.outputs[0].token_ids
        if caching:
            # 40 shared tokens are 10 full blocks of 4.
            assert manager.num_prefix_hit_tokens - hits_before == 40
        assert output.num_cached_tokens == (40 if caching else 0)  # vLLM's RequestOutput field
    assert outputs[True] == outputs[False]


def test_seeded_sampling_is_batch_independent(tiny_model_dir) -> None:
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=12)
    prompt = random_prompts(1, seed=6)[0]
    llm = make_llm(tiny_model_dir)
    alone = llm.generate({"prompt_token_ids": prompt}, seeded)[0].outputs[0].token_ids
    others = random_prompts(12, seed=7)
    noisy = [SamplingParams(temperature=1.0, max_tokens=15)] * len(others)
    arrivals = {0: [(f"o{i}", p, s) for i, (p, s) in enumerate(zip(others[:6], noisy))]}
    arrivals[2] = [("seeded", prompt, seeded)] + [(f"p{i}", p, s) for i, (p, s) in enumerate(zip(others[6:], noisy))]
    busy = run_all(llm, arrivals)["seeded"].outputs[0].token_ids
    assert busy == alone
    assert llm.generate({"prompt_token_ids": prompt}, seeded)[0].outputs[0].token_ids == alone


def test_an_llm_seed_reproduces_unseeded_sampling(tiny_model_dir) -> None:
    prompts = [{"prompt_token_ids": p} for p in random_prompts(3, seed=9)]
    unseeded = SamplingParams(temperature=1.0, max_tokens=12)

    def tokens(seed: int) -> list[list[int]]:
        outputs = make_llm(tiny_model_dir, seed=seed).generate(prompts, unseeded)
        return [output.outputs[0].token_ids for output in outputs]

    first = tokens(seed=3)
    torch.rand(100)  # draws between the two runs do not matter: the seed resets the generator
    assert tokens(seed=3) == first
    assert tokens(seed=4) != first
    # Unseeded, an LLM does not reseed the caller's generators (vLLM's default seed 0 is its own process's).
    after = []
    for caller_seed in (555, 999):
        torch.manual_seed(caller_seed)
        make_llm(tiny_model_dir)
        after.append(torch.rand(1))
    assert not torch.equal(*after)
    with pytest.raises(ValueError, match=r"seed='3': must be None or an integer"):
        make_llm(tiny_model_dir, seed="3")


def test_n_completions_share_the_prompt(tiny_model_dir) -> None:
    llm = make_llm(tiny_model_dir, enable_prefix_caching=False)
    prompt = random_prompts(1, seed=8, min_len=30, max_len=30)[0]
    output = llm.generate({"prompt_token_ids": prompt}, SamplingParams(n=3, seed=0, max_tokens=8))[0]
    assert [c.index for c in output.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 8 and c.finish_reason == "length" for c in output.outputs)
    assert len({tuple(c.token_ids) for c in output.outputs}) > 1
    greedy = llm.generate({"prompt_token_ids": prompt}, SamplingParams(n=2, temperature=0.0, max_tokens=8))[0]
    assert greedy.outputs[0].token_ids == greedy.outputs[1].token_ids
    assert all_blocks_free(llm)


def test_logprobs_match_the_model(tiny_model_dir) -> None:
    llm = make_llm(tiny_model_dir, max_num_batched_tokens=8)  # the prompt spans several chunks
    prompt = random_prompts(1, seed=9, min_len=20, max_len=20)[0]
    params = SamplingParams(temperature=0.0, max_tokens=4, logprobs=3, prompt_logprobs=2)
    output = llm.generate({"prompt_token_ids": prompt}, params)[0]
    completion = output.outputs[0]
    reference = _reference_logprobs(tiny_model_dir, prompt + completion.token_ids)
    assert output.prompt_logprobs[0] is None and len(output.prompt_logprobs) == len(prompt)
    for position, entry in enumerate(output.prompt_logprobs[1:]):
        token = prompt[position + 1]
        assert entry[token].logprob == pytest.approx(reference[position, token].item(), abs=1e-4)
        assert len(entry) >= 2
    for step, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs)):
        row = reference[len(prompt) - 1 + step]
        assert entry[token].rank == 1 and entry[token].logprob == pytest.approx(row.max().item(), abs=1e-4)
        assert len(entry) == 3
    assert completion.cumulative_logprob == pytest.approx(
        sum(e[t].logprob for t, e in zip(completion.token_ids, completion.logprobs))
    )


def _reference_logprobs(model_dir, token_ids: list[int]) -> torch.Tensor:
    """Log-softmax at every position from a fresh one-sequence forward over all tokens."""
    worker = make_llm(model_dir)._executor.worker
    n = len(token_ids)
    blocks = list(range(1, -(-n // worker.block_size) + 1))
    step = StepInput(token_ids, list(range(n)), [n], [n], [blocks], list(range(n)))
    return worker.execute(step).log_softmax(-1)


def test_abort_frees_blocks_in_any_state(tiny_model_dir) -> None:
    llm = make_llm(tiny_model_dir, max_num_seqs=2)
    prompts = random_prompts(4, seed=10)
    for index, prompt in enumerate(prompts):
        llm.engine.add_request(prompt, SamplingParams(max_tokens=50), request_id=str(index))
    llm.engine.step()
    llm.engine.step()
    assert llm.engine.abort("0")  # running
    assert llm.engine.abort("3")  # still waiting
    assert not llm.engine.abort("3")
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
    assert all_blocks_free(llm)


@pytest.mark.parametrize(
    "options",
    [{}, {"async_scheduling": True}, {"speculative_config": {"num_speculative_tokens": 3}}],
    ids=["sync", "async", "speculative"],
)
def test_a_failed_step_fails_its_caller_and_the_other_streams_go_on(tiny_model_dir, options) -> None:
    """A step that raises (a device error) reaches the stream that ran it; the engine's other
    requests compute that step's tokens again and end as they would have."""
    prompts = [p * 3 for p in random_prompts(2, seed=12, max_len=8)]  # repeats: n-gram proposals
    params = SamplingParams(temperature=0.0, max_tokens=12)
    plain = make_llm(tiny_model_dir).generate([{"prompt_token_ids": p} for p in prompts], params)
    llm = make_llm(tiny_model_dir, **options)
    first = llm.stream({"prompt_token_ids": prompts[0]}, params)
    second = llm.stream({"prompt_token_ids": prompts[1]}, params)
    next(first), next(second), next(first)
    execute, failures = llm.engine.runner.execute, []

    def fail_once(*args, **kwargs):
        if not failures:
            failures.append(1)
            raise RuntimeError("device lost")
        return execute(*args, **kwargs)

    llm.engine.runner.execute = fail_once
    with pytest.raises(RuntimeError, match="device lost"):
        list(first)  # its next step fails (one output may already wait, with async scheduling)
    assert list(second)[-1].outputs[0].token_ids == plain[1].outputs[0].token_ids
    assert not llm.engine.has_unfinished_requests() and all_blocks_free(llm)


@pytest.mark.parametrize("options", [{}, {"async_scheduling": True}], ids=["sync", "async"])
def test_a_step_whose_results_fail_to_read_fails_its_caller_and_the_other_streams_go_on(
    tiny_model_dir, options, monkeypatch
) -> None:
    """Scoring a prompt's logprobs runs out of memory: that step is rewound (sync) or read again
    (async), and an open stream ends as it would have, its stop token and logprobs included."""
    prompt = random_prompts(1, seed=14)[0]
    plain = make_llm(tiny_model_dir).generate({"prompt_token_ids": prompt}, GREEDY)[0].outputs[0].token_ids
    params = replace(GREEDY, max_tokens=12, logprobs=0, stop_token_ids=[plain[3]])
    expected = make_llm(tiny_model_dir).generate({"prompt_token_ids": prompt}, params)[0].outputs[0]
    score, failures = llm_engine.compute_prompt_logprobs, []

    def fail_once(*args, **kwargs):
        if not failures:
            failures.append(1)
            raise torch.OutOfMemoryError("out of memory scoring the prompt")
        return score(*args, **kwargs)

    monkeypatch.setattr(llm_engine, "compute_prompt_logprobs", fail_once)
    llm = make_llm(tiny_model_dir, **options)
    stream = llm.stream({"prompt_token_ids": prompt}, params)
    next(stream)
    with pytest.raises(torch.OutOfMemoryError):
        llm.generate({"prompt_token_ids": random_prompts(1, seed=15)[0]}, replace(GREEDY, prompt_logprobs=1))
    final = list(stream)[-1].outputs[0]
    assert failures
    assert (final.token_ids, final.finish_reason) == (expected.token_ids, "stop")
    assert len(final.logprobs) == len(final.token_ids)
    assert not llm.engine.has_unfinished_requests() and all_blocks_free(llm)


@pytest.mark.parametrize(
    "options",
    [{}, {"async_scheduling": True}, {"speculative_config": {"num_speculative_tokens": 3}}],
    ids=["sync", "async", "speculative"],
)
def test_a_request_whose_token_fails_to_be_judged_fails_alone(tiny_model_dir, options, monkeypatch) -> None:
    """Judging one request's token raises (a stop check's bug, say): that request is aborted and
    reported, the step's other rows are still judged, and the engine steps on."""
    prompts = [p * 3 for p in random_prompts(3, seed=16, max_len=8)]  # repeats: n-gram proposals
    params = SamplingParams(temperature=0.0, max_tokens=12, logprobs=1)
    plain = make_llm(tiny_model_dir).generate([{"prompt_token_ids": p} for p in prompts], params)
    judge, judged = llm_engine.LLMEngine._process_token, []

    def fail_on_the_first_prompt(self, group, *args, **kwargs):
        if group.prompt_token_ids == prompts[0]:
            judged.append(1)
            if len(judged) == 3:
                raise RuntimeError("stop check failed")
        return judge(self, group, *args, **kwargs)

    monkeypatch.setattr(llm_engine.LLMEngine, "_process_token", fail_on_the_first_prompt)
    llm = make_llm(tiny_model_dir, **options)
    for i, prompt in enumerate(prompts):  # the failing request is the first row of each step
        llm.engine.add_request(prompt, params, request_id=str(i))
    finished, failures = {}, []
    while llm.engine.has_unfinished_requests():
        finished.update({o.request_id: o for o in llm.engine.step() if o.finished})
        failures += llm.engine.take_failures()
    assert [(request_id, str(error)) for request_id, error in failures] == [("0", "stop check failed")]
    assert sorted(finished) == ["1", "2"]
    for i in (1, 2):
        got, want = finished[str(i)].outputs[0], plain[i].outputs[0]
        assert got.token_ids == want.token_ids and same_logprobs(got.logprobs, want.logprobs)
    assert all_blocks_free(llm)
    judged.clear()
    with pytest.raises(RuntimeError, match="judged: stop check failed"):
        llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    assert not llm.engine.has_unfinished_requests() and all_blocks_free(llm)


@pytest.mark.parametrize("failing", ["runner.execute", "_read"])
@pytest.mark.parametrize("options", [{}, {"async_scheduling": True}], ids=["sync", "async"])
def test_a_seeded_request_retried_after_a_failed_step_draws_as_without_it(tiny_model_dir, options, failing) -> None:
    seeded = SamplingParams(temperature=1.0, seed=7, max_tokens=8)
    prompt = random_prompts(1, seed=16)[0]
    expected = make_llm(tiny_model_dir, **options).generate({"prompt_token_ids": prompt}, seeded)
    llm = make_llm(tiny_model_dir, **options)
    owner = llm.engine.runner if failing == "runner.execute" else llm.engine
    name = failing.split(".")[-1]
    original, calls = getattr(owner, name), []

    def fail_third(*args, **kwargs):
        result = original(*args, **kwargs)  # a device error shows after the step drew its tokens
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("device lost")
        return result

    setattr(owner, name, fail_third)
    llm.engine.add_request(prompt, seeded, request_id="seeded")
    outputs, errors = [], 0
    while llm.engine.has_unfinished_requests():
        try:
            outputs += llm.engine.step()
        except RuntimeError:
            errors += 1
    assert errors == 1
    assert outputs[-1].outputs[0].token_ids == expected[0].outputs[0].token_ids


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        ([1] * 300, SamplingParams(max_tokens=4), "max_model_len=256"),
        ([], SamplingParams(max_tokens=4), "empty"),
        ([1, 2, 999], SamplingParams(max_tokens=4), "not in the vocabulary"),
        ("text", SamplingParams(max_tokens=4), "no tokenizer"),
        ([1, 2, 3], {"max_tokens": 4}, "SamplingParams"),
        (None, SamplingParams(max_tokens=4), "a string or a list of token ids, not NoneType"),
        (b"ab", SamplingParams(max_tokens=4), "a string or a list of token ids, not bytes"),
    ],
)
def test_bad_request_fails_alone(tiny_model_dir, prompt, params, message) -> None:
    llm = make_llm(tiny_model_dir)
    good = random_prompts(3, seed=11)
    for index, p in enumerate(good):
        llm.engine.add_request(p, GREEDY, request_id=f"good{index}")
    llm.engine.step()
    with pytest.raises(ValueError, match=message):
        llm.engine.add_request(prompt, params, request_id="bad")
    finished = run_all(llm, {})
    assert sorted(finished) == ["good0", "good1", "good2"]
    assert all(len(o.outputs[0].token_ids) == 10 for o in finished.values())
    assert all_blocks_free(llm)


def test_prompt_token_ids_may_come_from_an_iterator(tiny_model_dir) -> None:
    llm = make_llm(tiny_model_dir)
    (prompt,) = random_prompts(1, seed=12)
    llm.engine.add_request(prompt, GREEDY, request_id="list")
    llm.engine.add_request(iter(prompt), GREEDY, request_id="iterator")
    finished = run_all(llm, {})
    assert finished["iterator"].prompt_token_ids == prompt
    assert finished["iterator"].outputs[0].token_ids == finished["list"].outputs[0].token_ids


def test_request_ids_never_clash_with_sequence_ids(tiny_model_dir) -> None:
    llm = make_llm(tiny_model_dir)
    engine = llm.engine
    prompts = random_prompts(4, seed=14)
    pair = replace(GREEDY, n=2)
    engine.add_request(prompts[0], GREEDY, request_id="a#1")
    # Its second sequence would be "a#1" too: refused before anything is queued.
    with pytest.raises(ValueError, match="sequence id 'a#1' is already in use"):
        engine.add_request(prompts[1], pair, request_id="a")
    engine.add_request(prompts[1], pair, request_id="b")
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request(prompts[2], GREEDY, request_id="b#0")
    # Automatic ids skip those callers took.
    engine.add_request(prompts[2], GREEDY, request_id="1")
    automatic = [engine.add_request(prompts[3], GREEDY) for _ in range(2)]
    assert len(set(automatic) | {"a#1", "b", "1"}) == 5
    finished = run_all(llm, {})
    assert sorted(finished) == sorted(["a#1", "b", "1", *automatic])
    assert [len(c.token_ids) for c in finished["b"].outputs] == [10, 10]
    assert all_blocks_free(llm)


def test_automatic_ids_skip_those_an_n_request_would_clash_with(tiny_model_dir) -> None:
    llm = make_llm(tiny_model_dir)
    engine = llm.engine
    prompts = random_prompts(2, seed=15)
    engine.add_request(prompts[0], GREEDY, request_id="0#1")
    # Counter value "0" would name its sequences "0#0" and "0#1": the next free one is used.
    request_id = engine.add_request(prompts[1], replace(GREEDY, n=2))
    assert request_id != "0"
    finished = run_all(llm, {})
    assert sorted(finished) == sorted(["0#1", request_id])
    assert all_blocks_free(llm)


def test_a_refused_request_is_told_what_is_wrong_not_an_internal_id(tiny_model_dir) -> None:
    """The caller of ``add_request`` knows which request it added; an id in the message would
    be a sequence's ("c#0") or one the caller never saw (``LLM``'s, the server's)."""
    llm = make_llm(tiny_model_dir)
    with pytest.raises(ValueError, match=r"^a prompt of 300 tokens leaves no room") as refused:
        llm.engine.add_request([1] * 300, replace(GREEDY, n=2), request_id="c")
    assert "#" not in str(refused.value) and "'c'" not in str(refused.value)
    with pytest.raises(ValueError, match=r"^prompt 1: a prompt of 300 tokens leaves no room"):
        llm.generate([{"prompt_token_ids": [1] * n} for n in (5, 300)], GREEDY)
    assert not llm.engine.has_unfinished_requests()


def test_bad_sampling_values_are_refused() -> None:
    with pytest.raises(ValueError, match="max_tokens=0"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="temperature=-1"):
        SamplingParams(temperature=-1.0)


def test_prompt_logprobs_ignore_the_prefix_cache(tiny_model_dir) -> None:
    llm = make_llm(tiny_model_dir)
    prompt = random_prompts(1, seed=12, min_len=24, max_len=24)[0]
    llm.generate({"prompt_token_ids": prompt}, GREEDY)  # publishes the prompt's blocks
    params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=1)
    output = llm.generate({"prompt_token_ids": prompt}, params)[0]
    assert len(output.prompt_logprobs) == len(prompt)
    assert all(entry is not None for entry in output.prompt_logprobs[1:])


def test_only_the_first_of_n_sequences_computes_a_prompt_for_its_logprobs(tiny_model_dir) -> None:
    """Sequences 1..n-1 of a one-token request start after sequence 0 has finished, so they are
    queued, not forked: they read the prompt from the prefix cache, which only sequence 0 skips."""
    llm = make_llm(tiny_model_dir)
    prompt = random_prompts(1, seed=16, min_len=24, max_len=24)[0]  # 6 full blocks of 4
    params = SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=1, prompt_logprobs=1)
    manager = llm.engine.scheduler.block_manager
    hits_before = manager.num_prefix_hit_tokens
    output = llm.generate({"prompt_token_ids": prompt}, params)[0]
    # The last full block is recomputed: a hit leaves at least one token to compute.
    assert manager.num_prefix_hit_tokens - hits_before == 3 * 20
    alone = llm.generate({"prompt_token_ids": prompt}, replace(params, n=1))[0]
    assert len(output.outputs) == 4 and output.prompt_logprobs == alone.prompt_logprobs
    assert all_blocks_free(llm)


def test_stop_token_ids_end_the_sequence(tiny_model_dir) -> None:
    llm = make_llm(tiny_model_dir)
    prompt = random_prompts(1, seed=13)[0]
    free_run = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=12))[0]
    stop_token = free_run.outputs[0].token_ids[5]
    first = free_run.outputs[0].token_ids.index(stop_token)
    params = SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[stop_token])
    stopped = llm.generate({"prompt_token_ids": prompt}, params)[0].outputs[0]
    assert stopped.token_ids == free_run.outputs[0].token_ids[: first + 1]
    assert (stopped.finish_reason, stopped.stop_reason) == ("stop", stop_token)
    min_params = SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[stop_token], min_tokens=12)
    assert llm.generate({"prompt_token_ids": prompt}, min_params)[0].outputs[0].finish_reason == "length"


@pytest.fixture
def byte_level_model_dir(tiny_model_dir, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    byte_level_bpe().save_pretrained(model_dir)
    return model_dir


def test_the_end_releases_an_unfinished_character_and_a_stop_string_it_completes(byte_level_model_dir) -> None:
    llm = make_llm(byte_level_model_dir)
    tokenizer = llm.get_tokenizer()
    lead = tokenizer.encode("你", add_special_tokens=False)[0]  # 0xE4: each one cuts the one before short
    params = SamplingParams(temperature=0.0, max_tokens=3, allowed_token_ids=[lead])
    output = llm.generate("hi", params)[0].outputs[0]
    assert output.text == tokenizer.decode(output.token_ids) == "\ufffd" * 3
    assert output.finish_reason == "length"
    stopped = llm.generate("hi", replace(params, stop=["\ufffd" * 3]))[0].outputs[0]
    assert (stopped.text, stopped.finish_reason, stopped.stop_reason) == ("", "stop", "\ufffd" * 3)
    assert stopped.token_ids == output.token_ids


def test_a_stop_token_kept_in_the_text_is_the_stop_reason_over_a_stop_string(byte_level_model_dir) -> None:
    llm = make_llm(byte_level_model_dir)
    [token] = llm.get_tokenizer().encode("x", add_special_tokens=False)
    params = SamplingParams(
        temperature=0.0, allowed_token_ids=[token], stop_token_ids=[token], stop=["x"], include_stop_str_in_output=True
    )
    output = llm.generate("hi", params)[0].outputs[0]
    assert (output.text, output.finish_reason, output.stop_reason) == ("x", "stop", token)


@pytest.mark.parametrize("num_speculative_tokens", [0, 3])
def test_min_tokens_holds_even_when_every_token_would_stop(tiny_model_dir, num_speculative_tokens: int) -> None:
    # Every token a stop token: the sampler's min_tokens mask leaves no token it may pick.
    speculation = {"speculative_config": {"num_speculative_tokens": num_speculative_tokens}}
    llm = make_llm(tiny_model_dir, **(speculation if num_speculative_tokens else {}))
    prompt = {"prompt_token_ids": random_prompts(1, seed=15)[0]}
    for temperature in (0.0, 1.0):
        params = SamplingParams(
            temperature=temperature, max_tokens=8, min_tokens=4, stop_token_ids=list(range(VOCAB_SIZE))
        )
        output = llm.generate(prompt, params)[0].outputs[0]
        assert (len(output.token_ids), output.finish_reason) == (5, "stop")
        assert output.stop_reason == output.token_ids[-1]


def test_logit_bias_bans_the_greedy_pick_and_forces_another(tiny_model_dir) -> None:
    llm = make_llm(tiny_model_dir, async_scheduling=True)
    prompt = {"prompt_token_ids": random_prompts(1, seed=14)[0]}
    free_run = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=6))[0].outputs[0].token_ids
    banned = SamplingParams(temperature=0.0, max_tokens=6, logit_bias={free_run[0]: -100})
    steered = llm.generate(prompt, banned)[0].outputs[0].token_ids
    assert free_run[0] not in steered and steered != free_run
    forced_token = (free_run[0] + 1) % VOCAB_SIZE
    for temperature in (0.0, 1.0):
        forced = SamplingParams(temperature=temperature, max_tokens=6, logit_bias={forced_token: 100})
        assert llm.generate(prompt, forced)[0].outputs[0].token_ids == [forced_token] * 6
    # A token id past the vocabulary would index past the logits' row: refused, the request alone.
    running = llm.engine.add_request(prompt["prompt_token_ids"], SamplingParams(temperature=0.0, max_tokens=6))
    with pytest.raises(ValueError, match=rf"^logit_bias=\[{VOCAB_SIZE}\]: token ids not in the vocabulary"):
        llm.engine.add_request(prompt["prompt_token_ids"], SamplingParams(logit_bias={VOCAB_SIZE: 1, 0: 1}))
    assert run_all(llm, {})[running].outputs[0].token_ids == free_run


@pytest.mark.parametrize("num_speculative_tokens", [0, 3])
def test_allowed_token_ids_restrict_what_is_generated(tiny_model_dir, num_speculative_tokens: int) -> None:
    speculation = {"speculative_config": {"num_speculative_tokens": num_speculative_tokens}}
    llm = make_llm(tiny_model_dir, **(speculation if num_speculative_tokens else {"async_scheduling": True}))
    prompt = random_prompts(1, seed=16)[0]
    allowed = sorted(set(prompt[:4]))  # the n-gram proposer proposes from the prompt
    banned_others = {token_id: -100.0 for token_id in range(VOCAB_SIZE) if token_id not in allowed}
    restricted = SamplingParams(temperature=0.0, max_tokens=10, allowed_token_ids=allowed)
    tokens = llm.generate({"prompt_token_ids": prompt}, restricted)[0].outputs[0].token_ids
    assert set(tokens) <= set(allowed) and len(tokens) == 10
    # The argmax over the allowed tokens, which a bias of -100 on all others also gives.
    steered = SamplingParams(temperature=0.0, max_tokens=10, logit_bias=banned_others)
    assert tokens == llm.generate({"prompt_token_ids": prompt}, steered)[0].outputs[0].token_ids
    assert (llm.engine.stats().num_draft_tokens > 0) == bool(num_speculative_tokens)
    sampled = SamplingParams(temperature=1.0, max_tokens=10, allowed_token_ids=allowed, seed=3, n=4)
    for output in llm.generate({"prompt_token_ids": prompt}, sampled)[0].outputs:
        assert set(output.token_ids) <= set(allowed)
    # Refused alone: a token id past the logits' row, or only end tokens while min_tokens holds them back.
    running = llm.engine.add_request(prompt, restricted)
    with pytest.raises(ValueError, match=rf"^allowed_token_ids=\[{VOCAB_SIZE}\]: token ids not in the vocabulary"):
        llm.engine.add_request(prompt, SamplingParams(allowed_token_ids=[0, VOCAB_SIZE]))
    only_stops = SamplingParams(allowed_token_ids=[7], stop_token_ids=[7], min_tokens=2)
    with pytest.raises(ValueError, match=r"^allowed_token_ids=\[7\]: each ends the sequence while min_tokens=2 holds"):
        llm.engine.add_request(prompt, only_stops)
    assert run_all(llm, {})[running].outputs[0].token_ids == tokens


def test_structured_outputs_on_a_model_without_a_tokenizer_are_refused(tiny_model_dir) -> None:
    llm = make_llm(tiny_model_dir)
    regex = SamplingParams(structured_outputs=StructuredOutputsParams(regex="[0-9]+"))
    with pytest.raises(ValueError, match="structured_outputs need a tokenizer, which this model lacks"):
        llm.engine.add_request(random_prompts(1, seed=3)[0], regex)
    assert not llm.engine.has_unfinished_requests()


def test_eos_ends_a_sequence_unless_ignore_eos(tiny_model_dir, tmp_path) -> None:
    prompt = {"prompt_token_ids": random_prompts(1, seed=3)[0]}
    greedy = SamplingParams(temperature=0.0, max_tokens=8)
    free_run = make_llm(tiny_model_dir).generate(prompt, greedy)[0].outputs[0].token_ids
    # The same model, with a token it writes third as its EOS.
    model_dir = tmp_path / "with-eos"
    shutil.copytree(tiny_model_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "eos_token_id": free_run[2]}))
    llm = make_llm(model_dir)
    stopped = llm.generate(prompt, greedy)[0].outputs[0]
    assert stopped.token_ids == free_run[: free_run.index(free_run[2]) + 1] and stopped.finish_reason == "stop"
    # No tokenizer names it EOS: as in vLLM, a configured EOS id is a stop token, named as the reason.
    assert stopped.stop_reason == free_run[2]
    ignored = llm.generate(prompt, replace(greedy, ignore_eos=True))[0].outputs[0]
    assert ignored.token_ids == free_run and ignored.finish_reason == "length"
    # ignore_eos keeps EOS from ending the sequence; min_tokens still holds it back (vLLM).
    held = llm.generate(prompt, replace(greedy, ignore_eos=True, min_tokens=4))[0].outputs[0]
    assert free_run[2] not in held.token_ids[:4] and held.token_ids[:2] == free_run[:2]
    only_eos = SamplingParams(allowed_token_ids=[free_run[2]], ignore_eos=True, min_tokens=2)
    with pytest.raises(ValueError, match=r"min_tokens=2 holds the ends back"):
        llm.engine.add_request(prompt["prompt_token_ids"], only_eos)


def test_an_outputs_metrics_do_not_change_after_it_is_returned(tiny_model_dir) -> None:
    llm = make_llm(tiny_model_dir)
    llm.engine.add_request(random_prompts(1, seed=17)[0], GREEDY, request_id="r")
    (first,) = llm.engine.step()
    before = replace(first.metrics)
    while llm.engine.has_unfinished_requests():
        last = llm.engine.step()
    assert first.metrics == before and first.metrics.finished_time is None
    assert last[0].metrics.finished_time is not None


def test_final_only_requests_report_once_with_the_cumulative_result(tiny_model_dir) -> None:
    """A "final_only" request is reported only when it finishes, with what a "cumulative" one
    reports last; the cumulative one is reported on every step it progresses."""
    # No prefix cache: the second request's prefill would start after the first's cached
    # blocks, and a matmul of other rows may round differently in the last bit.
    llm = make_llm(tiny_model_dir, enable_prefix_caching=False)
    prompt = random_prompts(1, seed=12)[0]
    params = SamplingParams(temperature=0.0, max_tokens=6, logprobs=2)
    reports: dict[str, list] = {"cumulative": [], "final": []}
    # One after the other: alone in its batch, each computes the same bits.
    for request_id, kind in (("cumulative", "cumulative"), ("final", "final_only")):
        llm.engine.add_request(prompt, replace(params, output_kind=kind), request_id=request_id)
        while llm.engine.has_unfinished_requests():
            for output in llm.engine.step():
                reports[output.request_id].append(output)
    assert [len(o.outputs[0].token_ids) for o in reports["cumulative"]] == [1, 2, 3, 4, 5, 6]
    (final,) = reports["final"]
    last = reports["cumulative"][-1]
    assert final.finished and last.finished
    assert final.outputs[0].token_ids == last.outputs[0].token_ids
    assert final.outputs[0].logprobs == last.outputs[0].logprobs


def test_warm_up_with_a_token_budget_no_step_can_fill(tiny_model_dir) -> None:
    """max_num_batched_tokens above max_num_seqs * max_model_len: the prefill buckets stop at
    that product (no step holds more), and warm-up runs a step of each."""
    llm = make_llm(tiny_model_dir, max_num_seqs=2, max_model_len=64, max_num_batched_tokens=512, warm_up=True)
    assert llm.engine.runner.buckets.prefill[-1].num_tokens == 128
    outputs = llm.generate([{"prompt_token_ids": p} for p in random_prompts(3, seed=13)], GREEDY)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [10, 10, 10]


def test_eager_steps_run_their_real_tokens_not_the_buckets(tiny_model_dir) -> None:
    """Padding is for graphs of fixed shapes: eagerly the model sees only the step's tokens,
    and the logits are those of the same step padded (as a graph compiler runs it)."""
    llm = make_llm(tiny_model_dir, max_num_seqs=4)
    worker = llm.engine.runner.executor.worker
    assert not worker.pads_to_bucket
    assert 768 in {b.num_tokens for b in llm.engine.runner.buckets.prefill}  # fine steps off XLA
    seen = []
    hook = worker.model.model.embed_tokens.register_forward_hook(lambda module, args, out: seen.append(out.shape[0]))
    prompt = random_prompts(1, seed=21, min_len=37, max_len=37)[0]
    step = StepInput(
        input_ids=prompt,
        positions=list(range(37)),
        query_lens=[37],
        seq_lens=[37],
        block_tables=[list(range(1, 11))],
        logits_indices=[36, 0, 0, 0],
        num_padded_tokens=64,
        num_padded_seqs=4,
        max_blocks_per_seq=64,
    )
    unpadded = worker.execute(step)
    worker.pads_to_bucket = True
    padded = worker.execute(step)
    hook.remove()
    assert seen == [37, 64]
    assert torch.allclose(unpadded, padded, rtol=1e-5, atol=1e-5)


def test_latency_samples_nobody_reads_stay_bounded(tiny_model_dir, monkeypatch) -> None:
    # Offline generate never asks for stats(): the engine keeps only the latest samples.
    monkeypatch.setattr(llm_engine, "MAX_KEPT_LATENCIES", 8)
    llm = make_llm(tiny_model_dir)
    for _ in range(3):
        llm.generate([{"prompt_token_ids": p} for p in random_prompts(4, seed=21)], GREEDY)
    stats = llm.engine.stats()
    assert len(stats.inter_token_latency) == 8 and len(stats.e2e_request_latency) == 8
    assert all(latency >= 0 for latency in stats.inter_token_latency)
    assert llm.engine.stats().inter_token_latency == []  # read, then cleared


def test_a_shut_down_llm_refuses_work_as_under_tensor_parallelism(tiny_model_dir) -> None:
    llm = make_llm(tiny_model_dir)
    prompt = {"prompt_token_ids": random_prompts(1, seed=4)[0]}
    assert len(llm.generate(prompt, GREEDY)[0].outputs[0].token_ids) == GREEDY.max_tokens
    llm.shutdown()
    llm.shutdown()  # a second call does nothing
    assert not llm.engine.is_alive
    with pytest.raises(RuntimeError, match="this LLM is shut down"):
        llm.generate(prompt, GREEDY)
    assert not llm.engine.has_unfinished_requests()


def _interrupt_once(target: object, name: str, after: bool = False) -> list[int]:
    """Make ``target.name`` raise KeyboardInterrupt on its first call (before or after running):
    a Ctrl-C landing there. Returns the list that counts the calls interrupted."""
    real, interrupted = getattr(target, name), []

    def interrupting(*args, **kwargs):
        if interrupted:
            return real(*args, **kwargs)
        interrupted.append(1)
        if after:
            real(*args, **kwargs)
        raise KeyboardInterrupt

    setattr(target, name, interrupting)
    return interrupted


@pytest.mark.parametrize(
    ("where", "after"),
    [
        ("scheduler.add_request", True),  # the scheduler holds it, the engine does not yet
        ("engine.add_request", True),  # the engine holds it, generate's cleanup list does not yet
        ("engine.abort", False),  # generate's cleanup cut short: the rest would run on
        ("scheduler._schedule_waiting", True),  # schedule() cut short, its plan half made
        ("engine._overlaps", False),  # after schedule() returned, before the step's guard
    ],
)
def test_an_llm_interrupted_anywhere_serves_the_next_call_alone(tiny_model_dir, where: str, after: bool) -> None:
    """A Ctrl-C during generate (while a stream is open) leaves no request behind and no state
    that fails later calls: they return what an uninterrupted LLM does, blocks all freed."""
    prompts = [{"prompt_token_ids": p} for p in random_prompts(6, seed=16)]
    params = SamplingParams(temperature=0.0, max_tokens=6)
    expected = make_llm(tiny_model_dir).generate(prompts, params)
    llm = make_llm(tiny_model_dir, max_num_seqs=2)
    stream = llm.stream(prompts[0], params)
    next(stream)
    owner, name = where.split(".")
    interrupted = _interrupt_once(llm.engine if owner == "engine" else llm.engine.scheduler, name, after)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(prompts[1:], params)
    assert interrupted
    outputs = llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in expected]
    assert list(stream)[-1].outputs[0].token_ids == expected[0].outputs[0].token_ids
    assert not llm.engine.has_unfinished_requests() and not llm._unread and all_blocks_free(llm)


@pytest.mark.parametrize("output_kind", ["cumulative", "delta"])
@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("nth", [1, 2, 3])
def test_a_ctrl_c_while_a_step_is_judged_waits_for_every_row(
    tiny_model_dir, monkeypatch, request, async_scheduling: bool, nth: int, output_kind: str
) -> None:
    """A Ctrl-C (a real SIGINT) while the ``nth`` row of a step takes its token: every row
    still takes its own (detokenized, stop-checked, its logprobs kept), then the caller sees
    KeyboardInterrupt, and the open streams read on as if none had come: the step's outputs,
    a finished one among them, come with the next step's."""
    previous_handler = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, as at a prompt
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous_handler))
    prompts = [{"prompt_token_ids": p} for p in random_prompts(3, seed=17)]
    # The first stream finishes in the interrupted step (without async scheduling).
    params = [SamplingParams(temperature=0.0, max_tokens=n, logprobs=1, output_kind=output_kind) for n in (2, 6)]
    expected = make_llm(tiny_model_dir, async_scheduling=async_scheduling).generate(
        prompts[:2], [replace(p, output_kind="cumulative") for p in params]
    )
    llm = make_llm(tiny_model_dir, async_scheduling=async_scheduling)
    streams = [llm.stream(prompt, p) for prompt, p in zip(prompts, params)]
    firsts = [next(stream) for stream in streams]
    process_token, calls = llm.engine._process_token, []

    def interrupted_process_token(*args, **kwargs):
        calls.append(1)
        if len(calls) == nth:
            signal.raise_signal(signal.SIGINT)
        return process_token(*args, **kwargs)

    monkeypatch.setattr(llm.engine, "_process_token", interrupted_process_token)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(prompts[2], params[1])
    assert len(calls) >= nth
    for stream, first, want in zip(streams, firsts, expected, strict=True):
        outputs = [first, *stream]
        got = functools.reduce(RequestOutput.add, outputs) if output_kind == "delta" else outputs[-1]
        assert got.finished
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        assert got.outputs[0].text == want.outputs[0].text
        assert len(got.outputs[0].logprobs) == len(want.outputs[0].token_ids)
    assert not llm.engine.has_unfinished_requests() and not llm._unread and all_blocks_free(llm)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_outputs_held_by_ctrl_cs_in_steps_one_after_another_all_come(
    tiny_model_dir, monkeypatch, request, async_scheduling: bool
) -> None:
    """Steps one after another each cut by a Ctrl-C, the last one too: the outputs each held
    back come with the next step that returns, none lost, in order."""
    previous_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous_handler))
    prompts = random_prompts(2, seed=18)
    params = SamplingParams(temperature=0.0, max_tokens=5, output_kind="delta")

    def run(interrupted_calls: set[int]) -> tuple[dict[str, list[int]], int]:
        engine = make_llm(tiny_model_dir, async_scheduling=async_scheduling).engine
        process_token, calls = engine._process_token, []

        def interrupted_process_token(*args, **kwargs):
            calls.append(1)
            if len(calls) in interrupted_calls:
                signal.raise_signal(signal.SIGINT)
            return process_token(*args, **kwargs)

        monkeypatch.setattr(engine, "_process_token", interrupted_process_token)
        for index, prompt in enumerate(prompts):
            engine.add_request(prompt, params, request_id=str(index))
        tokens: dict[str, list[int]] = {"0": [], "1": []}
        num_interrupts = 0
        while engine.has_unfinished_requests():
            try:
                outputs = engine.step()
            except KeyboardInterrupt:
                num_interrupts += 1
                continue
            for output in outputs:
                tokens[output.request_id] += output.outputs[0].token_ids
        return tokens, num_interrupts

    expected, _ = run(set())
    # Two rows a step: the first row of the first two steps, and the last row of the last.
    assert run({1, 3, 10}) == (expected, 3)


def test_an_aborted_requests_held_outputs_go_with_it(tiny_model_dir) -> None:
    """Outputs a Ctrl-C held back are not returned for a request aborted since: its id may be used again."""
    engine = make_llm(tiny_model_dir).engine
    params = SamplingParams(temperature=0.0, max_tokens=5)
    engine.add_request(random_prompts(1, seed=18)[0], params, request_id="0")
    engine._held_outputs = engine.step()  # as a Ctrl-C while judging would have held them
    assert engine._held_outputs and engine.abort("0")
    assert not engine.has_unfinished_requests() and engine.step() == []


def test_delta_outputs_join_into_the_cumulative_result(tiny_model_dir) -> None:
    """A "delta" request reports what each step added (completions that gained nothing left
    out, prompt logprobs in the first only); joined, its reports are the "cumulative" result."""
    llm = make_llm(tiny_model_dir, enable_prefix_caching=False)
    prompt = random_prompts(1, seed=14)[0]
    params = SamplingParams(n=2, temperature=0.8, seed=3, max_tokens=7, logprobs=2, prompt_logprobs=1)
    reports: dict[str, list] = {"cumulative": [], "delta": []}
    for kind in reports:  # one after the other: alone in its batch, each computes the same bits
        llm.engine.add_request(prompt, replace(params, output_kind=kind), request_id=kind)
        while llm.engine.has_unfinished_requests():
            for output in llm.engine.step():
                reports[output.request_id].append(output)
    deltas, want = reports["delta"], reports["cumulative"][-1]
    assert [o.finished for o in deltas] == [False] * (len(deltas) - 1) + [True]
    assert deltas[0].prompt_logprobs is not None and all(o.prompt_logprobs is None for o in deltas[1:])
    assert all(c.token_ids or c.finish_reason for o in deltas for c in o.outputs)
    joined = deltas[0]
    for output in deltas[1:]:
        joined = joined.add(output)
    assert joined.finished and same_logprobs(joined.prompt_logprobs, want.prompt_logprobs)
    assert [c.index for c in joined.outputs] == [0, 1]
    for got, expected in zip(joined.outputs, want.outputs, strict=True):
        assert (got.token_ids, got.finish_reason, got.cumulative_logprob) == (
            expected.token_ids,
            expected.finish_reason,
            expected.cumulative_logprob,
        )
        assert same_logprobs(got.logprobs, expected.logprobs)
    assert all_blocks_free(llm)


def test_use_tqdm_counts_finished_requests_with_tqdm_or_the_callers_bar(tiny_model_dir) -> None:
    llm = make_llm(tiny_model_dir)
    prompts = [{"prompt_token_ids": p} for p in random_prompts(3, seed=21)]
    bars: list[FakeBar] = []
    llm.generate(prompts, GREEDY, use_tqdm=lambda **options: bars.append(FakeBar(**options)) or bars[-1])
    assert [(bar.total, bar.n, bar.closed) for bar in bars] == [(3, 3, True)]
    assert len(llm.generate(prompts, GREEDY, use_tqdm=True)) == 3

"""The scheduler, driven by a fake model whose next token depends on the whole sequence.

The fake model keeps a paged "KV cache" of (position, token) per slot and computes the next
token from what it reads back through the block table, so a wrong table, a block shared
before it was computed, or a lost token changes the output.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pytest

from neuron_llm.config import CacheConfig, SchedulerConfig
from neuron_llm.engine import NULL_BLOCK_ID, Request, RequestStatus, Scheduler, SchedulerOutput, block_manager


@dataclass(frozen=True)
class Params:
    max_tokens: int | None = 4


def next_token(token_ids: list[int]) -> int:
    # Position-weighted, so a reordered or shifted context gives another token.
    return sum((position + 1) * token for position, token in enumerate(token_ids)) % 1000


def expected_output(prompt: list[int], num_output_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(num_output_tokens):
        tokens.append(next_token(tokens))
    return tokens[len(prompt) :]


class FakeModel:
    """Writes each scheduled token into its KV slot, then samples from the slots it reads back.

    Proposals (speculative decoding) are verified as the rejection sampler does greedily:
    each one is kept while it is the token the model would write there.
    """

    def __init__(self, scheduler: Scheduler) -> None:
        self.block_manager = scheduler.block_manager
        self.block_size = scheduler.block_manager.block_size
        self.slots: dict[tuple[int, int], tuple[int, int]] = {}

    def step(self, output: SchedulerOutput) -> dict[str, list[int]]:
        for entry in output.scheduled:
            for offset, token in enumerate(entry.token_ids):
                position = entry.num_computed_tokens + offset
                block_id = entry.block_ids[position // self.block_size]
                assert block_id != NULL_BLOCK_ID
                assert self.block_manager.ref_count(block_id) == 1, "writing into a shared block"
                assert not self.block_manager.is_cached(block_id), "writing into a published block"
                self.slots[block_id, position % self.block_size] = (position, token)
        sampled = {}
        for entry in output.scheduled:
            if entry.is_sampling:
                context = [
                    self.slots[entry.block_ids[position // self.block_size], position % self.block_size]
                    for position in range(entry.seq_len)
                ]
                assert [position for position, _ in context] == list(range(entry.seq_len))
                tokens = [token for _, token in context]
                known = entry.seq_len - entry.num_draft_tokens
                new = [next_token(tokens[:known])]
                for proposal_index in range(known, entry.seq_len):
                    if new[-1] != tokens[proposal_index]:
                        break
                    new.append(next_token(tokens[: proposal_index + 1]))
                sampled[entry.request.request_id] = new
        return sampled


def make_scheduler(
    num_blocks: int = 64,
    block_size: int = 4,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 64,
    enable_chunked_prefill: bool = True,
    enable_prefix_caching: bool = False,
    max_model_len: int = 256,
) -> Scheduler:
    return Scheduler(
        CacheConfig(block_size=block_size, enable_prefix_caching=enable_prefix_caching),
        SchedulerConfig(
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            enable_chunked_prefill=enable_chunked_prefill,
        ),
        num_blocks,
    )


def make_request(request_id: str, prompt: list[int], max_tokens: int | None = 4) -> Request:
    return Request(request_id, prompt, Params(max_tokens))


def step(scheduler: Scheduler, model: FakeModel) -> SchedulerOutput:
    output = scheduler.schedule()
    scheduler.update_from_output(output, model.step(output))
    return output


def run_to_completion(scheduler: Scheduler, model: FakeModel, max_steps: int = 1000) -> list[SchedulerOutput]:
    outputs = []
    while scheduler.has_unfinished_requests():
        assert len(outputs) < max_steps, "no progress"
        outputs.append(step(scheduler, model))
    return outputs


def ids(output: SchedulerOutput) -> list[str]:
    return [entry.request.request_id for entry in output.scheduled]


def solo_output(prompt: list[int], max_tokens: int | None, max_model_len: int = 256) -> list[int]:
    scheduler = make_scheduler(num_blocks=256, max_model_len=max_model_len)
    request = make_request("solo", prompt, max_tokens)
    scheduler.add_request(request)
    run_to_completion(scheduler, FakeModel(scheduler))
    return request.output_token_ids


def test_solo_run_matches_the_fake_model() -> None:
    assert solo_output([3, 1, 4, 1, 5], 6) == expected_output([3, 1, 4, 1, 5], 6)


def test_decodes_come_before_prefills() -> None:
    scheduler = make_scheduler()
    model = FakeModel(scheduler)
    scheduler.add_request(make_request("a", [1, 2, 3, 4, 5]))
    first = step(scheduler, model)
    assert ids(first) == ["a"] and first.scheduled[0].num_new_tokens == 5 and first.scheduled[0].is_sampling

    scheduler.add_request(make_request("b", [6, 7, 8, 9, 10, 11]))
    second = step(scheduler, model)
    assert ids(second) == ["a", "b"]
    decode, prefill = second.scheduled
    first_token = expected_output([1, 2, 3, 4, 5], 1)
    assert (decode.num_computed_tokens, decode.num_new_tokens, decode.token_ids) == (5, 1, first_token)
    assert (prefill.num_computed_tokens, prefill.num_new_tokens) == (0, 6)
    assert second.num_scheduled_tokens == 7


def test_chunked_prefill_splits_a_long_prompt_to_the_budget() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=8)
    model = FakeModel(scheduler)
    prompt = list(range(1, 21))
    long = make_request("long", prompt, max_tokens=2)
    scheduler.add_request(long)
    outputs = run_to_completion(scheduler, model)
    entries = [output.scheduled[0] for output in outputs]
    assert [entry.num_new_tokens for entry in entries] == [8, 8, 4, 1]
    assert [entry.num_computed_tokens for entry in entries] == [0, 8, 16, 20]
    assert [entry.is_sampling for entry in entries] == [False, False, True, True]
    assert long.output_token_ids == expected_output(prompt, 2)


def test_chunks_share_the_budget_with_decodes() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=8)
    model = FakeModel(scheduler)
    scheduler.add_request(make_request("a", [1, 2, 3], max_tokens=10))
    step(scheduler, model)
    scheduler.add_request(make_request("b", list(range(20)), max_tokens=1))
    chunks = []
    for _ in range(3):
        output = step(scheduler, model)
        assert ids(output) == ["a", "b"] and output.scheduled[0].num_new_tokens == 1
        chunks.append(output.scheduled[1].num_new_tokens)
    assert chunks == [7, 7, 6]
    assert output.scheduled[1].is_sampling


def test_without_chunked_prefill_a_prompt_waits_until_it_fits() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=8, enable_chunked_prefill=False)
    model = FakeModel(scheduler)
    with pytest.raises(ValueError, match="max_num_batched_tokens=8"):
        scheduler.add_request(make_request("huge", list(range(9))))
    scheduler.add_request(make_request("a", [1, 2, 3, 4, 5]))
    scheduler.add_request(make_request("b", [6, 7, 8, 9, 10]))
    first = step(scheduler, model)
    assert ids(first) == ["a"]
    second = step(scheduler, model)
    assert ids(second) == ["a", "b"]
    assert [entry.num_new_tokens for entry in second.scheduled] == [1, 5]


def test_without_chunked_prefill_a_prompt_of_the_whole_budget_waits_for_a_step_of_its_own() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=8, enable_chunked_prefill=False)
    model = FakeModel(scheduler)
    scheduler.add_request(make_request("a", [1, 2, 3], max_tokens=3))
    step(scheduler, model)
    scheduler.add_request(make_request("b", list(range(20, 28))))
    # Beside a's decode only 7 tokens are left: b waits rather than being cut.
    steps = [step(scheduler, model) for _ in range(3)]
    assert [ids(output) for output in steps] == [["a"], ["a"], ["b"]]
    assert steps[2].scheduled[0].num_new_tokens == 8


def test_without_chunked_prefill_a_recompute_longer_than_the_budget_is_chunked() -> None:
    scheduler = make_scheduler(num_blocks=6, block_size=4, max_num_batched_tokens=9, enable_chunked_prefill=False)
    model = FakeModel(scheduler)
    a = make_request("a", [1, 2, 3, 4, 5], max_tokens=8)
    b = make_request("b", list(range(10, 18)), max_tokens=4)
    scheduler.add_request(a)
    step(scheduler, model)
    scheduler.add_request(b)
    outputs = [step(scheduler, model) for _ in range(5)]
    assert outputs[3].preempted_ids == ["b"] and b.num_tokens == 11
    # 11 tokens to recompute never fit a budget of 9: b takes the 8 left after a's decode.
    resumed = outputs[4].scheduled[1]
    assert resumed.request is b and (resumed.num_computed_tokens, resumed.num_new_tokens) == (0, 8)
    assert not resumed.is_sampling
    run_to_completion(scheduler, model)
    assert a.output_token_ids == solo_output([1, 2, 3, 4, 5], 8)
    assert b.output_token_ids == solo_output(list(range(10, 18)), 4)


def test_max_num_seqs_limits_the_batch() -> None:
    scheduler = make_scheduler(max_num_seqs=2)
    model = FakeModel(scheduler)
    requests = [make_request(request_id, [1, 2], max_tokens=2) for request_id in "abc"]
    for request in requests:
        scheduler.add_request(request)
    assert ids(step(scheduler, model)) == ["a", "b"]
    assert ids(step(scheduler, model)) == ["a", "b"]
    third = step(scheduler, model)
    assert ids(third) == ["c"] and [r.status.is_finished for r in requests] == [True, True, False]


def test_waiting_requests_are_first_come_first_served() -> None:
    # 4 usable blocks of 4 tokens: "a" takes 3, so "b" (2 blocks) waits, and "c" (1 block)
    # waits behind it although it would fit.
    scheduler = make_scheduler(num_blocks=5, block_size=4)
    model = FakeModel(scheduler)
    a = make_request("a", list(range(12)), max_tokens=2)
    b = make_request("b", list(range(8)), max_tokens=1)
    c = make_request("c", [1, 2], max_tokens=1)
    for request in (a, b, c):
        scheduler.add_request(request)
    first = step(scheduler, model)
    assert ids(first) == ["a"] and a.block_ids == [1, 2, 3]
    assert list(scheduler.waiting) == [b, c]
    second = step(scheduler, model)
    assert ids(second) == ["a"] and second.scheduled[0].block_ids == [1, 2, 3, 4]
    third = step(scheduler, model)
    assert ids(third) == ["b", "c"] and a.status is RequestStatus.FINISHED_LENGTH


def test_a_preempted_fork_waits_behind_requests_that_arrived_before_it() -> None:
    scheduler = make_scheduler(num_blocks=7, block_size=2)  # 6 usable blocks
    model = FakeModel(scheduler)
    parent = make_request("parent", [1, 2, 3], max_tokens=8)
    scheduler.add_request(parent)
    step(scheduler, model)
    waiting = make_request("waiting", [9] * 9, max_tokens=1)  # 5 blocks: does not fit beside the parent
    scheduler.add_request(waiting)
    step(scheduler, model)
    child = make_request("child", [1, 2, 3], max_tokens=6)
    scheduler.fork("parent", child)  # arrives after "waiting", yet runs at once
    for _ in range(10):
        if child.status == RequestStatus.PREEMPTED:
            break
        step(scheduler, model)
    assert child.status == RequestStatus.PREEMPTED
    assert list(scheduler.waiting) == [waiting, child]
    admitted: list[str] = []
    for output in run_to_completion(scheduler, model):
        admitted += [request_id for request_id in ids(output) if request_id not in admitted]
    assert admitted.index("waiting") < admitted.index("child")
    assert child.output_token_ids == solo_output([1, 2, 3], 6)


def test_newest_running_request_is_preempted_and_recomputed() -> None:
    # 4 usable blocks of 2 tokens; each request needs a third block at its second decode.
    scheduler = make_scheduler(num_blocks=5, block_size=2)
    model = FakeModel(scheduler)
    a = make_request("a", [1, 2, 3], max_tokens=4)
    b = make_request("b", [4, 5, 6], max_tokens=4)
    scheduler.add_request(a)
    scheduler.add_request(b)
    step(scheduler, model)
    assert (a.block_ids, b.block_ids) == ([1, 2], [3, 4])
    step(scheduler, model)
    assert len(b.output_token_ids) == 2
    c = make_request("c", [7, 8, 9], max_tokens=1)
    scheduler.add_request(c)

    third = step(scheduler, model)
    assert third.preempted_ids == ["b"] and ids(third) == ["a"]
    assert a.block_ids == [1, 2, 3]
    assert b.status is RequestStatus.PREEMPTED and b.num_computed_tokens == 0 and b.block_ids == []
    assert b.num_preemptions == 1 and len(b.output_token_ids) == 2
    assert list(scheduler.waiting) == [b, c]
    assert scheduler.block_manager.num_free_blocks == 1
    assert scheduler.stats().num_preemptions == 1

    outputs = run_to_completion(scheduler, model)
    resumed = next(entry for output in outputs for entry in output.scheduled if entry.request is b)
    assert (resumed.num_computed_tokens, resumed.num_new_tokens) == (0, 5)
    assert a.output_token_ids == solo_output([1, 2, 3], 4)
    assert b.output_token_ids == solo_output([4, 5, 6], 4)
    assert c.output_token_ids == solo_output([7, 8, 9], 1)
    assert scheduler.block_manager.num_free_blocks == 4


def test_the_newest_request_preempts_itself() -> None:
    scheduler = make_scheduler(num_blocks=5, block_size=2)
    model = FakeModel(scheduler)
    a = make_request("a", [1, 2, 3], max_tokens=2)
    b = make_request("b", [4, 5, 6, 7], max_tokens=3)
    scheduler.add_request(a)
    scheduler.add_request(b)
    step(scheduler, model)
    assert (a.block_ids, b.block_ids) == ([1, 2], [3, 4])

    # "a" decodes into its second block; "b" needs a third block and is the newest.
    second = step(scheduler, model)
    assert ids(second) == ["a"] and second.preempted_ids == ["b"]
    assert b.status is RequestStatus.PREEMPTED and list(scheduler.waiting) == [b]
    run_to_completion(scheduler, model)
    assert a.output_token_ids == solo_output([1, 2, 3], 2)
    assert b.output_token_ids == solo_output([4, 5, 6, 7], 3)


def test_no_request_is_admitted_in_a_step_that_preempted() -> None:
    scheduler = make_scheduler(num_blocks=5, block_size=2, max_num_batched_tokens=4)
    model = FakeModel(scheduler)
    a = make_request("a", [1, 2], max_tokens=3)
    b = make_request("b", [3, 4, 5, 6, 7], max_tokens=2)
    scheduler.add_request(a)
    scheduler.add_request(b)
    first = step(scheduler, model)
    assert [entry.num_new_tokens for entry in first.scheduled] == [2, 2]
    assert (a.block_ids, b.block_ids) == ([1], [2])

    # b's next chunk needs 2 blocks, 1 is free: it preempts itself. A 3-token chunk of its
    # recompute would then fit in the 2 free blocks, but memory is short: it waits.
    second = step(scheduler, model)
    assert ids(second) == ["a"] and second.preempted_ids == ["b"]
    assert a.block_ids == [1, 3] and list(scheduler.waiting) == [b]
    assert scheduler.block_manager.num_free_blocks == 2
    run_to_completion(scheduler, model)
    assert a.output_token_ids == solo_output([1, 2], 3)
    assert b.output_token_ids == solo_output([3, 4, 5, 6, 7], 2)


def test_preempted_request_resumes_from_its_own_cached_blocks() -> None:
    scheduler = make_scheduler(num_blocks=5, block_size=2, enable_prefix_caching=True)
    model = FakeModel(scheduler)
    a = make_request("a", [1, 2, 3], max_tokens=4)
    b = make_request("b", [4, 5, 6], max_tokens=4)
    scheduler.add_request(a)
    scheduler.add_request(b)
    step(scheduler, model)
    step(scheduler, model)
    third = step(scheduler, model)
    assert third.preempted_ids == ["b"]
    # b's blocks 3 and 4 stay cached; a evicts b's tail block first.
    assert a.block_ids == [1, 2, 4]
    assert scheduler.block_manager.is_cached(3)

    outputs = run_to_completion(scheduler, model)
    resumed = next(entry for output in outputs for entry in output.scheduled if entry.request is b)
    assert (resumed.num_computed_tokens, resumed.num_new_tokens) == (2, 3)
    assert resumed.block_ids[0] == 3
    assert b.num_cached_tokens == 0  # counted at the first admission, as vLLM counts it
    assert a.output_token_ids == solo_output([1, 2, 3], 4)
    assert b.output_token_ids == solo_output([4, 5, 6], 4)


def test_prefix_cache_hit_skips_computed_blocks() -> None:
    scheduler = make_scheduler(num_blocks=16, block_size=4, enable_prefix_caching=True)
    model = FakeModel(scheduler)
    prompt = list(range(1, 11))
    a = make_request("a", prompt, max_tokens=5)
    scheduler.add_request(a)
    step(scheduler, model)
    assert a.block_ids == [1, 2, 3]

    b = make_request("b", prompt[:8] + [50, 51, 52], max_tokens=3)
    c = make_request("c", prompt[:8], max_tokens=3)
    scheduler.add_request(b)
    scheduler.add_request(c)
    second = step(scheduler, model)
    assert ids(second) == ["a", "b", "c"]
    _, hit_b, hit_c = second.scheduled
    assert (hit_b.num_computed_tokens, hit_b.num_new_tokens, hit_b.block_ids) == (8, 3, [1, 2, 4])
    # c's 8 tokens fill blocks 1 and 2, but the last token must be computed: one block hit.
    assert (hit_c.num_computed_tokens, hit_c.num_new_tokens, hit_c.block_ids) == (4, 4, [1, 5])
    assert scheduler.block_manager.ref_count(1) == 3 and scheduler.block_manager.ref_count(2) == 2
    assert (b.num_cached_tokens, c.num_cached_tokens) == (8, 4)
    assert scheduler.stats().prefix_cache_hit_rate == pytest.approx(12 / (10 + 11 + 8))

    run_to_completion(scheduler, model)
    for request in (a, b, c):
        assert request.output_token_ids == solo_output(request.prompt_token_ids, request.sampling_params.max_tokens)
    assert scheduler.block_manager.num_free_blocks == 15


def test_fork_shares_the_parents_full_prompt_blocks() -> None:
    scheduler = make_scheduler(num_blocks=16, block_size=4)
    model = FakeModel(scheduler)
    prompt = list(range(1, 11))
    parent = make_request("a", prompt, max_tokens=3)
    scheduler.add_request(parent)
    step(scheduler, model)
    child = make_request("a-1", prompt, max_tokens=3)
    scheduler.fork("a", child)
    assert child.status is RequestStatus.RUNNING and child.block_ids == [1, 2]
    assert child.num_computed_tokens == 8
    assert scheduler.block_manager.ref_count(1) == 2

    second = step(scheduler, model)
    assert ids(second) == ["a", "a-1"]
    assert (second.scheduled[1].num_new_tokens, second.scheduled[1].block_ids) == (2, [1, 2, 4])
    run_to_completion(scheduler, model)
    assert parent.output_token_ids == child.output_token_ids == solo_output(prompt, 3)
    assert scheduler.block_manager.num_free_blocks == 15

    scheduler.add_request(make_request("b", [1]))
    with pytest.raises(ValueError, match="must have the prompt"):
        scheduler.fork("b", make_request("b-1", [2]))


def test_fork_of_a_finished_parent_queues_the_child() -> None:
    scheduler = make_scheduler()
    model = FakeModel(scheduler)
    scheduler.add_request(make_request("a", [1, 2, 3], max_tokens=1))
    step(scheduler, model)
    child = make_request("a-1", [1, 2, 3], max_tokens=2)
    scheduler.fork("a", child)
    assert child.status is RequestStatus.WAITING and list(scheduler.waiting) == [child]
    run_to_completion(scheduler, model)
    assert child.output_token_ids == solo_output([1, 2, 3], 2)


def test_running_requests_stay_in_arrival_order() -> None:
    # r is preempted, then p is forked (f arrives after r) and aborted; r is admitted again
    # after f joined the batch, yet sits before it: f is the newest, the first to preempt.
    scheduler = make_scheduler(num_blocks=5, block_size=2)
    model = FakeModel(scheduler)
    p = make_request("p", [1, 2, 3], max_tokens=6)
    r = make_request("r", [4, 5], max_tokens=4)
    scheduler.add_request(p)
    scheduler.add_request(r)
    step(scheduler, model)
    step(scheduler, model)
    assert step(scheduler, model).preempted_ids == ["r"]
    f = make_request("f", [1, 2, 3], max_tokens=6)
    scheduler.fork("p", f)
    scheduler.abort("p")
    output = step(scheduler, model)
    assert ids(output) == ["f", "r"]
    assert scheduler.running == [r, f]
    run_to_completion(scheduler, model)
    assert r.output_token_ids == solo_output([4, 5], 4)
    assert f.output_token_ids == solo_output([1, 2, 3], 6)


def test_abort_in_any_state_frees_blocks() -> None:
    scheduler = make_scheduler(num_blocks=8)
    model = FakeModel(scheduler)
    waiting = make_request("w", [1, 2, 3])
    scheduler.add_request(waiting)
    assert scheduler.abort("w")
    assert waiting.status is RequestStatus.FINISHED_ABORTED
    first = scheduler.schedule()
    assert first.is_empty and not scheduler.has_unfinished_requests()

    running = make_request("r", list(range(9)), max_tokens=5)
    scheduler.add_request(running)
    step(scheduler, model)
    assert running.block_ids == [1, 2, 3]
    assert scheduler.abort("r")
    assert running.block_ids == [] and scheduler.block_manager.num_free_blocks == 7
    assert not scheduler.abort("r") and not scheduler.abort("unknown")
    assert scheduler.schedule().is_empty
    assert not scheduler.has_unfinished_requests()


def test_abort_while_the_step_runs_drops_its_output() -> None:
    scheduler = make_scheduler()
    model = FakeModel(scheduler)
    request = make_request("a", [1, 2, 3])
    scheduler.add_request(request)
    output = scheduler.schedule()
    sampled = model.step(output)
    scheduler.abort("a")
    assert scheduler.update_from_output(output, sampled) == []
    assert request.output_token_ids == [] and scheduler.block_manager.num_free_blocks == 63


def test_finish_on_a_stop_token_frees_blocks() -> None:
    scheduler = make_scheduler()
    model = FakeModel(scheduler)
    request = make_request("a", [1, 2, 3], max_tokens=10)
    scheduler.add_request(request)
    step(scheduler, model)
    assert scheduler.finish("a", RequestStatus.FINISHED_STOPPED)
    assert request.status is RequestStatus.FINISHED_STOPPED and request.output_token_ids
    assert scheduler.block_manager.usage == 0.0


def test_length_limits_finish_requests() -> None:
    scheduler = make_scheduler(max_model_len=8)
    model = FakeModel(scheduler)
    by_max_tokens = make_request("a", [1, 2, 3], max_tokens=2)
    by_model_len = make_request("b", [1, 2, 3, 4, 5], max_tokens=None)
    scheduler.add_request(by_max_tokens)
    scheduler.add_request(by_model_len)
    finished = []
    while scheduler.has_unfinished_requests():
        output = scheduler.schedule()
        finished.append(scheduler.update_from_output(output, model.step(output)))
    assert finished == [[], ["a"], ["b"]]
    assert by_max_tokens.status is RequestStatus.FINISHED_LENGTH
    assert by_model_len.output_token_ids == expected_output([1, 2, 3, 4, 5], 3)


def test_a_prompt_as_long_as_the_context_samples_one_token_past_it() -> None:
    # Scoring a prompt cut to the context (its prompt logprobs): the token after it needs no
    # position or KV slot, but all 9 prompt tokens need theirs (3 blocks of 4, not 2).
    scheduler = make_scheduler(num_blocks=4, max_model_len=9)
    prompt = [5, 3, 8, 1, 4, 9, 2, 6, 7]
    for max_tokens in (2, None):
        with pytest.raises(ValueError, match="leaves no room for output within max_model_len=9"):
            scheduler.add_request(make_request(f"more-{max_tokens}", prompt, max_tokens=max_tokens))
    request = make_request("score", prompt, max_tokens=1)
    scheduler.add_request(request)
    run_to_completion(scheduler, FakeModel(scheduler))
    assert request.output_token_ids == expected_output(prompt, 1)
    assert request.status is RequestStatus.FINISHED_LENGTH
    with pytest.raises(ValueError, match="needs 3 KV blocks but the pool has 2"):
        make_scheduler(num_blocks=3, max_model_len=9).add_request(make_request("score", prompt, max_tokens=1))


def test_requests_that_can_never_run_are_refused() -> None:
    # 3 usable blocks of 2 tokens: 6 tokens of K/V; the last sampled token needs none.
    scheduler = make_scheduler(num_blocks=4, block_size=2, max_model_len=100)
    scheduler.add_request(make_request("fits", [1, 2, 3, 4], max_tokens=3))
    with pytest.raises(ValueError, match="needs 4 KV blocks but the pool has 3"):
        scheduler.add_request(make_request("too-long", [1, 2, 3, 4], max_tokens=4))
    with pytest.raises(ValueError, match="KV pool, which holds 7 tokens of one sequence"):
        scheduler.add_request(make_request("unbounded", list(range(7)), max_tokens=None))
    with pytest.raises(ValueError, match="already in use"):
        scheduler.add_request(make_request("fits", [1]))
    with pytest.raises(ValueError, match="empty"):
        scheduler.add_request(make_request("empty", []))
    with pytest.raises(ValueError, match="max_model_len=100"):
        scheduler.add_request(make_request("no-room", list(range(100))))
    with pytest.raises(ValueError, match="max_model_len=None"):
        Scheduler(CacheConfig(), SchedulerConfig(), num_blocks=8)


def test_without_max_tokens_a_sequence_stops_where_the_pool_is_full(caplog: pytest.LogCaptureFixture) -> None:
    # 3 usable blocks of 2 tokens hold one sequence of 7 tokens (the last sampled one needs no
    # K/V), fewer than max_model_len: a request without max_tokens finishes by length there
    # instead of being refused, or preempting itself forever. Starting so is worth a warning.
    with caplog.at_level("WARNING", logger="neuron_llm.engine.scheduler"):
        assert make_scheduler(num_blocks=100, block_size=2, max_model_len=100).max_seq_len == 100
        assert not caplog.records
        scheduler = make_scheduler(num_blocks=4, block_size=2, max_model_len=100)
    assert scheduler.max_seq_len == 7
    assert "(3 blocks of 2) holds 7 tokens of one sequence, fewer than max_model_len=100" in caplog.text
    model = FakeModel(scheduler)
    unbounded = make_request("unbounded", [1, 2], max_tokens=None)
    scheduler.add_request(unbounded)
    while scheduler.has_unfinished_requests():
        output = scheduler.schedule()
        scheduler.update_from_output(output, model.step(output))
    assert unbounded.status is RequestStatus.FINISHED_LENGTH
    assert unbounded.output_token_ids == expected_output([1, 2], 5)
    assert scheduler.num_preemptions == 0
    assert scheduler.block_manager.num_free_blocks == 3


def test_stats() -> None:
    scheduler = make_scheduler(num_blocks=9, max_num_seqs=1)
    model = FakeModel(scheduler)
    scheduler.add_request(make_request("a", list(range(8))))
    scheduler.add_request(make_request("b", [1]))
    step(scheduler, model)
    stats = scheduler.stats()
    assert (stats.num_waiting, stats.num_running, stats.num_preemptions) == (1, 1, 0)
    assert stats.kv_cache_usage == pytest.approx(2 / 8)
    assert stats.prefix_cache_hit_rate == 0.0


def test_a_preempted_request_finding_its_own_blocks_is_no_prefix_cache_hit() -> None:
    # The hit rate says how often prompts share cached prefixes: unique prompts give 0 however
    # often their own blocks come back after preemption.
    scheduler = make_scheduler(num_blocks=5, block_size=2, enable_prefix_caching=True)
    model = FakeModel(scheduler)
    requests = [make_request(name, prompt, max_tokens=4) for name, prompt in [("a", [1, 2, 3]), ("b", [4, 5, 6])]]
    for request in requests:
        scheduler.add_request(request)
    while scheduler.has_unfinished_requests():
        step(scheduler, model)
    assert scheduler.num_preemptions >= 1
    assert scheduler.stats().prefix_cache_hit_rate == 0.0
    assert scheduler.block_manager.num_prefix_query_tokens == 6


def check_invariants(scheduler: Scheduler, unfinished: dict[str, Request], max_proposals: int = 0) -> None:
    """``max_proposals``: most proposals a request may compute past its known tokens (after ``schedule``)."""
    manager = scheduler.block_manager
    waiting, running = list(scheduler.waiting), scheduler.running
    assert sorted(r.request_id for r in waiting + running) == sorted(unfinished)
    for request in waiting:
        assert request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
        assert request.num_computed_tokens == 0 and request.block_ids == []
    holders: Counter[int] = Counter()
    for request in running:
        assert request.status is RequestStatus.RUNNING
        assert request.block_ids is manager.block_table(request.request_id)
        assert request.num_computed_tokens <= request.num_tokens + max_proposals
        assert request.num_computed_tokens <= len(request.block_ids) * manager.block_size
        if not max_proposals:  # blocks taken for proposals go back with the step's result
            assert len(request.block_ids) <= manager.num_blocks_for(request.num_tokens)
        holders.update(request.block_ids)
    assert NULL_BLOCK_ID not in holders and manager.ref_count(NULL_BLOCK_ID) == 0
    for block_id in range(1, manager.num_blocks):
        assert manager.ref_count(block_id) == holders[block_id]
    assert manager.num_free_blocks == manager.num_usable_blocks - len(holders)
    # A shared block is full and computed for every holder.
    for request in running:
        for index, block_id in enumerate(request.block_ids):
            if holders[block_id] > 1:
                assert (index + 1) * manager.block_size <= request.num_computed_tokens


def propose(scheduler: Scheduler, rng: random.Random) -> None:
    """Up to four proposals for each decoding request, each right (the fake model's token) or not."""
    for request in scheduler.running:
        if request.num_tokens_to_compute == 1 and request.num_output_tokens:
            count = rng.randint(0, 4)
            right = expected_output(request.prompt_token_ids, request.num_output_tokens + count)
            right = right[request.num_output_tokens :]
            request.draft_token_ids = [t if rng.random() < 0.7 else (t + 1) % 1000 for t in right]


def _two_decoding(scheduler: Scheduler, model: FakeModel, max_tokens: int = 40) -> tuple[Request, Request]:
    old, young = make_request("old", [1, 2, 3], max_tokens), make_request("young", [4, 5, 6, 7], max_tokens)
    scheduler.add_request(old)
    scheduler.add_request(young)
    step(scheduler, model)
    return old, young


def test_proposals_leave_a_token_for_each_younger_running_request() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=4)
    model = FakeModel(scheduler)
    old, young = _two_decoding(scheduler, model)
    step(scheduler, model)  # the young prompt's last 3 tokens (the budget left it 1 before)
    assert old.num_tokens_to_compute == young.num_tokens_to_compute == 1
    old.draft_token_ids = [7] * 8
    output = step(scheduler, model)
    assert [(e.request.request_id, e.num_new_tokens, e.num_draft_tokens) for e in output.scheduled] == [
        ("old", 3, 2),
        ("young", 1, 0),
    ]


def test_proposals_leave_the_oldest_waiting_request_its_first_chunk() -> None:
    # Plain decoding admits a request arriving while others decode at once; proposals filling
    # the step's budget would keep it waiting for as long as they keep coming.
    scheduler = make_scheduler(max_num_batched_tokens=8)
    model = FakeModel(scheduler)
    old, young = _two_decoding(scheduler, model)
    late = make_request("late", [8, 9, 10, 11, 12])
    scheduler.add_request(late)
    old.draft_token_ids, young.draft_token_ids = [7] * 4, [7] * 4
    output = step(scheduler, model)
    assert [(e.request.request_id, e.num_new_tokens, e.num_draft_tokens) for e in output.scheduled] == [
        ("old", 2, 1),
        ("young", 1, 0),
        ("late", 5, 0),
    ]


def test_proposing_requests_hash_the_waiting_prompt_once_a_step(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each proposing request asks what the oldest waiting request needs; its prompt's hit was
    # looked up (every block hashed) once for each of them, every step.
    scheduler = make_scheduler(
        num_blocks=1 + 16 + 8 * 2 + 1, max_num_seqs=9, max_num_batched_tokens=256, enable_prefix_caching=True
    )
    model = FakeModel(scheduler)
    prefix = list(range(1, 65))  # 16 full blocks
    scheduler.add_request(make_request("warm", [*prefix, 1], 1))
    run_to_completion(scheduler, model)
    for index in range(8):
        scheduler.add_request(make_request(f"r{index}", [100 + index] * 5, 6))
    step(scheduler, model)
    scheduler.add_request(make_request("late", [*prefix, *range(500, 540)]))  # does not fit: waits
    calls = []
    real_hash = block_manager.hash_block
    monkeypatch.setattr(block_manager, "hash_block", lambda *args: calls.append(1) or real_hash(*args))
    for request in scheduler.running:
        request.draft_token_ids = [7] * 3
    output = step(scheduler, model)
    assert len(output.scheduled) == 8 and scheduler.waiting[0].request_id == "late"
    assert len(calls) <= len(prefix) // 4 + 40 // 4 + 8  # the prompt once, and the steps' own full blocks


def test_proposals_leave_a_waiting_request_the_blocks_its_prefix_hit_needs() -> None:
    # Blocks of 4, 6 usable. "shared" decodes over a 16-token prompt (4 full cached blocks) and
    # holds 5; "late" shares those 16 tokens and needs 1 fresh block, the last free one. Sized
    # without its hit (5 blocks) it seemed out of reach, and proposals took the block every
    # step, keeping it waiting while "shared" ran.
    scheduler = make_scheduler(num_blocks=7, max_num_batched_tokens=64, enable_prefix_caching=True)
    model = FakeModel(scheduler)
    prompt = list(range(1, 17))
    shared = make_request("shared", [*prompt, 100], 8)
    scheduler.add_request(shared)
    step(scheduler, model)
    assert scheduler.block_manager.num_free_blocks == 1
    scheduler.add_request(make_request("late", [*prompt, 200, 201, 202]))
    shared.draft_token_ids = [7] * 4
    output = step(scheduler, model)
    # "shared" verifies the 2 proposals its own last block has room for, and takes no fresh one.
    assert [(e.request.request_id, e.num_new_tokens, e.num_draft_tokens) for e in output.scheduled] == [
        ("shared", 3, 2),
        ("late", 3, 0),
    ]
    assert scheduler.num_preemptions == 0


def test_the_blocks_of_refused_proposals_go_back_with_the_step() -> None:
    # Blocks of 4: one token and eight proposals fill 3 blocks; all refused, 5 tokens need 2.
    scheduler = make_scheduler(num_blocks=8, max_num_batched_tokens=64)
    model = FakeModel(scheduler)
    request = make_request("r", [1, 2, 3], 20)
    scheduler.add_request(request)
    step(scheduler, model)
    request.draft_token_ids = [next_token(request.all_token_ids) + 1] * 8  # the first is wrong
    output = step(scheduler, model)
    assert output.scheduled[0].num_draft_tokens == 8 and len(output.scheduled[0].block_ids) == 3
    assert (request.num_tokens, len(request.block_ids)) == (5, 2)
    assert scheduler.block_manager.num_free_blocks == 7 - 2
    # A waiting prompt of 5 blocks now fits at once, as it would have without proposals.
    scheduler.add_request(make_request("late", list(range(100, 120))))
    assert [e.request.request_id for e in step(scheduler, model).scheduled] == ["r", "late"]
    assert scheduler.num_preemptions == 0


def test_only_the_proposals_that_fit_the_free_blocks_are_verified() -> None:
    # Blocks of 4, 7 usable: "r" holds 1 (4 tokens), "young" 4 and needs a fifth for its next
    # token, which leaves "r" 1 block: the next token's slot and 4 of the 12 proposals.
    scheduler = make_scheduler(num_blocks=8, max_num_batched_tokens=64)
    model = FakeModel(scheduler)
    request, young = make_request("r", [1, 2, 3], 20), make_request("young", list(range(10, 26)), 4)
    scheduler.add_request(request)
    scheduler.add_request(young)
    step(scheduler, model)
    request.draft_token_ids = [7] * 12
    output = step(scheduler, model)
    assert [(e.request.request_id, e.num_new_tokens, e.num_draft_tokens) for e in output.scheduled] == [
        ("r", 5, 4),
        ("young", 1, 0),
    ]
    assert scheduler.num_preemptions == 0


def test_proposals_leave_a_free_block_for_each_younger_running_request() -> None:
    # Blocks of 4: each request holds one; the young one's is full, so its next token needs
    # the one free block, which the old one's proposals would otherwise take.
    scheduler = make_scheduler(num_blocks=4, max_num_batched_tokens=32)
    model = FakeModel(scheduler)
    old, young = _two_decoding(scheduler, model, max_tokens=8)
    assert scheduler.block_manager.num_free_blocks == 1
    old.draft_token_ids = [7] * 3
    output = step(scheduler, model)
    assert [e.num_draft_tokens for e in output.scheduled] == [0, 0]
    assert scheduler.num_preemptions == 0


def test_proposals_leave_a_younger_prefill_the_blocks_of_its_chunk() -> None:
    # Blocks of 4, 6 usable: the young prompt (20 tokens) has 9 computed in 3 blocks, the old
    # request 1; its next chunk of 11 tokens needs the last 2 free blocks, which the old one's
    # proposals must not take (the young one would be preempted and its prefill lost).
    scheduler = make_scheduler(num_blocks=7, max_num_batched_tokens=12)
    model = FakeModel(scheduler)
    old, young = make_request("old", [1, 2, 3], 8), make_request("young", list(range(10, 30)), 2)
    scheduler.add_request(old)
    scheduler.add_request(young)
    step(scheduler, model)
    assert (young.num_computed_tokens, scheduler.block_manager.num_free_blocks) == (9, 2)
    old.draft_token_ids = [7, 7]
    output = step(scheduler, model)
    assert [(e.request.request_id, e.num_new_tokens, e.num_draft_tokens) for e in output.scheduled] == [
        ("old", 1, 0),
        ("young", 11, 0),
    ]
    assert scheduler.num_preemptions == 0


@pytest.mark.parametrize("speculate", [False, True], ids=["plain", "speculative"])
@pytest.mark.parametrize("seed", range(8))
def test_randomized_stress(seed: int, speculate: bool) -> None:
    rng = random.Random(seed)
    block_size, budget, max_num_seqs, max_model_len = 4, 16, 4, 30
    chunked, prefix = rng.choice([True, False]), rng.choice([True, False])
    scheduler = make_scheduler(
        num_blocks=12,
        block_size=block_size,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget,
        enable_chunked_prefill=chunked,
        enable_prefix_caching=prefix,
        max_model_len=max_model_len,
    )
    model = FakeModel(scheduler)
    bases = [[rng.randrange(1000) for _ in range(12)] for _ in range(3)]
    pending = []
    for index in range(40):
        prefix_tokens = rng.choice(bases)[: rng.randrange(13)]
        prompt = prefix_tokens + [rng.randrange(1000) for _ in range(rng.randint(1, 4))]
        pending.append(make_request(f"r{index}", prompt, rng.choice([None, *range(1, 13)])))

    every: dict[str, Request] = {}
    unfinished: dict[str, Request] = {}
    aborted: set[str] = set()
    num_forks = num_proposals = 0

    def abort_random() -> None:
        request_id = rng.choice(sorted(unfinished))
        assert scheduler.abort(request_id)
        aborted.add(request_id)
        del unfinished[request_id]

    for step_index in range(2000):
        if not pending and not unfinished:
            break
        for _ in range(rng.randint(0, 2)):
            if pending:
                request = pending.pop(0)
                scheduler.add_request(request)
                every[request.request_id] = unfinished[request.request_id] = request
        if scheduler.running and rng.random() < 0.05:
            parent = rng.choice(scheduler.running)
            child = make_request(f"fork{num_forks}", parent.prompt_token_ids, rng.randint(1, 6))
            num_forks += 1
            scheduler.fork(parent.request_id, child)
            every[child.request_id] = unfinished[child.request_id] = child
        if unfinished and rng.random() < 0.03:
            abort_random()
        check_invariants(scheduler, unfinished)

        if speculate:
            propose(scheduler, rng)
        output = scheduler.schedule()
        assert output.num_scheduled_tokens <= budget and len(output.scheduled) <= max_num_seqs
        assert len(set(ids(output))) == len(output.scheduled)
        num_proposals += sum(entry.num_draft_tokens for entry in output.scheduled)
        check_invariants(scheduler, unfinished, max_proposals=4)
        sampled = model.step(output)
        if unfinished and rng.random() < 0.03:
            abort_random()
        for request_id in scheduler.update_from_output(output, sampled):
            del unfinished[request_id]
        check_invariants(scheduler, unfinished)
    else:
        pytest.fail("requests never finished")
    assert not scheduler.has_unfinished_requests() and scheduler.schedule().is_empty
    for request_id, request in every.items():
        max_tokens = request.sampling_params.max_tokens
        solo = solo_output(request.prompt_token_ids, max_tokens, max_model_len)
        if request_id in aborted:
            assert request.status is RequestStatus.FINISHED_ABORTED
            assert request.output_token_ids == solo[: request.num_output_tokens]
        else:
            assert request.status is RequestStatus.FINISHED_LENGTH
            assert request.output_token_ids == solo
            assert len(solo) == min(max_tokens or max_model_len, max_model_len - request.num_prompt_tokens)
    assert scheduler.block_manager.num_free_blocks == scheduler.block_manager.num_usable_blocks
    assert scheduler.block_manager.usage == 0.0
    assert (num_proposals > 50) == speculate
    assert scheduler.stats().num_waiting == scheduler.stats().num_running == 0

"""``AsyncLLM``: the engine in its own thread, requests on an event loop."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from neuron_llm.beam_search import BeamSearchParams
from neuron_llm.engine.async_llm import (
    AsyncLLM,
    EngineClosedError,
    EngineError,
    QueueFullError,
    RequestAbortedError,
)
from neuron_llm.llm import LLM
from neuron_llm.outputs import RequestOutput
from neuron_llm.sampling_params import SamplingParams
from neuron_llm.serve.beam_search import beam_searched
from neuron_llm.serve.errors import UnavailableError
from neuron_llm.serve.generation import Generation, sampled
from neuron_llm.serve.metrics import ServerMetrics
from neuron_llm.serve.prompts import Prompt
from tests.serve.conftest import make_llm, make_slow_llm

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
LONG = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)


def run_with(llm: LLM, scenario: Callable[[AsyncLLM], Awaitable[None]], **options: Any) -> None:
    """Run ``scenario`` against an ``AsyncLLM`` around ``llm``, always shutting it down."""

    async def main() -> None:
        engine = AsyncLLM(llm.engine, **options)
        try:
            await scenario(engine)
        finally:
            await engine.shutdown(drain_timeout=0)

    asyncio.run(asyncio.wait_for(main(), timeout=60))


async def last(outputs: Any) -> RequestOutput:
    final = None
    async for final in outputs:
        pass
    assert final is not None and final.finished
    return final


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_outputs_stream_and_match_the_offline_api(model_dir: Path, async_scheduling: bool) -> None:
    llm = make_llm(model_dir, async_scheduling=async_scheduling)
    expected = llm.generate(["Hello world"], GREEDY)[0].outputs[0].token_ids

    async def scenario(engine: AsyncLLM) -> None:
        counts = [len(output.outputs[0].token_ids) async for output in engine.generate("Hello world", GREEDY)]
        assert counts == sorted(counts) and counts[-1] == len(expected)
        final = await last(engine.generate("Hello world", GREEDY))
        assert final.outputs[0].token_ids == expected

    run_with(llm, scenario)


def test_a_refused_request_fails_alone_before_any_output(model_dir: Path) -> None:
    async def scenario(engine: AsyncLLM) -> None:
        good = asyncio.ensure_future(last(engine.generate("Hello world", GREEDY)))
        with pytest.raises(ValueError, match="max_model_len"):
            await anext(engine.generate([1] * 300, GREEDY))
        assert (await good).outputs[0].finish_reason == "length"

    run_with(make_llm(model_dir), scenario)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_closing_a_stream_aborts_its_request_and_frees_its_blocks(model_dir: Path, async_scheduling: bool) -> None:
    llm = make_llm(model_dir, async_scheduling=async_scheduling)

    async def scenario(engine: AsyncLLM) -> None:
        outputs = engine.generate("Hello world", LONG)
        await anext(outputs)
        assert engine.stats().scheduler.kv_cache_usage > 0
        await outputs.aclose()
        for _ in range(200):
            if engine.stats().scheduler.kv_cache_usage == 0 and engine.num_in_flight == 0:
                break
            await asyncio.sleep(0.01)
        assert engine.stats().scheduler.kv_cache_usage == 0 and engine.num_in_flight == 0

    run_with(llm, scenario)
    assert not llm.engine.has_unfinished_requests()


def test_a_request_left_before_any_step_leaves_nothing_behind_on_an_idle_engine(model_dir: Path) -> None:
    # The add and the abort reach the engine thread in one batch of commands, after which it
    # is idle: no step runs, so nothing that a step would clean up may be left to it.
    llm = make_llm(model_dir)
    adding, release = threading.Event(), threading.Event()
    add_request = llm.engine.add_request

    def held_add_request(*args: Any, **kwargs: Any) -> None:
        adding.set()
        release.wait(10)
        add_request(*args, **kwargs)

    llm.engine.add_request = held_add_request  # type: ignore[method-assign]

    async def scenario(engine: AsyncLLM) -> None:
        first = asyncio.ensure_future(anext(engine.generate("Hello world", LONG)))
        await asyncio.to_thread(adding.wait, 10)
        first.cancel()  # queues the abort while the engine thread is inside the add
        with pytest.raises(asyncio.CancelledError):
            await first
        release.set()
        for _ in range(200):
            if engine.num_in_flight == 0 and not llm.engine.has_unfinished_requests():
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert engine.num_in_flight == 0 and not llm.engine.has_unfinished_requests()
        assert not engine._without_token and not engine._streams

    run_with(llm, scenario)


def test_a_stream_closed_late_aborts_only_its_own_request(model_dir: Path) -> None:
    async def scenario(engine: AsyncLLM) -> None:
        first = engine.generate("Hello world", LONG, request_id="same")
        await anext(first)
        # A second request under the same id is refused, but its consumer leaves before it
        # reads the refusal: its abort must not end the first request, which owns the id.
        refused = asyncio.ensure_future(anext(engine.generate("Hello", GREEDY, request_id="same")))
        await asyncio.sleep(0)
        refused.cancel()
        with pytest.raises(asyncio.CancelledError):
            await refused
        final = await last(first)
        assert len(final.outputs[0].token_ids) == LONG.max_tokens

    run_with(make_slow_llm(model_dir, step_s=0.002), scenario)


def test_aborting_by_id_ends_the_stream_and_releases_its_place(model_dir: Path) -> None:
    async def scenario(engine: AsyncLLM) -> None:
        # Aborted before its first output (the waiting queue's one place) and after it.
        for reads_first in (False, True):
            outputs = engine.generate("Hello world", LONG, request_id="mine")
            if reads_first:
                await anext(outputs)
                ending = asyncio.ensure_future(last(outputs))
            else:
                ending = asyncio.ensure_future(last(outputs))
                await asyncio.sleep(0)  # admitted: the request is queued to the engine
            engine.abort("mine")
            with pytest.raises(RequestAbortedError, match="'mine' was aborted"):
                await ending
        assert engine.num_in_flight == 0
        await last(engine.generate("Hello", GREEDY))  # the waiting queue has room again

    run_with(make_slow_llm(model_dir, step_s=0.002), scenario, max_waiting_requests=1)


def test_aborting_several_ids_ends_their_streams_and_a_bad_id_is_refused_alone(model_dir: Path) -> None:
    """vLLM's abort takes an id or several; anything else is refused in the caller, where on the
    engine's thread it would have failed every request in flight."""

    async def scenario(engine: AsyncLLM) -> None:
        other = asyncio.ensure_future(last(engine.generate("Hello", LONG, request_id="other")))
        endings = [asyncio.ensure_future(last(engine.generate("Hello", LONG, request_id=i))) for i in ("a", "b")]
        await asyncio.sleep(0.05)
        with pytest.raises(TypeError, match="request ids are strings, not 3"):
            engine.abort(["a", 3])  # type: ignore[list-item]
        engine.abort(["a", "b"])
        for ending in endings:
            with pytest.raises(RequestAbortedError):
                await ending
        assert (await other).outputs[0].finish_reason == "length"

    run_with(make_slow_llm(model_dir, step_s=0.002), scenario)


def test_prompts_are_taken_as_the_offline_api_takes_them(model_dir: Path) -> None:
    llm = make_llm(model_dir)
    expected = llm.generate(["Hello world"], GREEDY)[0].outputs[0].token_ids
    token_ids = llm.get_tokenizer().encode("Hello world")

    async def scenario(engine: AsyncLLM) -> None:
        for prompt in ("Hello world", {"prompt": "Hello world"}, {"prompt_token_ids": token_ids}, token_ids):
            assert (await last(engine.generate(prompt, GREEDY))).outputs[0].token_ids == expected
        with pytest.raises(ValueError, match="a prompt must be a string"):
            await anext(engine.generate({"text": "Hello"}, GREEDY))

    run_with(llm, scenario)


def test_a_full_waiting_queue_refuses_at_once(model_dir: Path) -> None:
    async def scenario(engine: AsyncLLM) -> None:
        first = asyncio.ensure_future(last(engine.generate("Hello", GREEDY)))
        await asyncio.sleep(0)  # the first is admitted, and has no output yet
        with pytest.raises(QueueFullError):
            await anext(engine.generate("Hello", GREEDY))
        await first
        await last(engine.generate("Hello", GREEDY))  # room again

    # Steps of 0.2 s: on a busy machine the engine thread could otherwise give the first its
    # first token before the second arrives, and it would no longer be waiting.
    run_with(make_slow_llm(model_dir, step_s=0.2), scenario, max_waiting_requests=1)


def test_a_running_request_asking_for_its_final_output_is_not_waiting(model_dir: Path) -> None:
    # Its consumer hears nothing until it ends, but once it has a token it is running: it must
    # not fill the waiting queue (vLLM's server asks for final outputs when not streaming).
    final_only = replace(LONG, output_kind="final_only")

    async def scenario(engine: AsyncLLM) -> None:
        running = asyncio.ensure_future(last(engine.generate("Hello", final_only, request_id="running")))
        while not engine.stats().scheduler.num_running:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # steps of 10 ms: its first token has come
        assert (await last(engine.generate("Hello", GREEDY))).outputs[0].finish_reason == "length"
        running.cancel()

    run_with(make_slow_llm(model_dir, step_s=0.01), scenario, max_waiting_requests=1)


def test_latencies_count_the_wait_for_the_step_in_flight(model_dir: Path) -> None:
    # The engine thread takes a request only between steps; its latencies start when generate
    # got it, as vLLM's front end stamps them. Held by events, not timed: the step in flight
    # waits for the test to release it.
    one_token = replace(GREEDY, max_tokens=1)
    llm = make_slow_llm(model_dir, step_s=0.01)
    step, entered, release = llm.engine.step, threading.Event(), threading.Event()
    hold_next = threading.Event()

    def held_step() -> list[Any]:
        if hold_next.is_set():
            hold_next.clear()
            entered.set()
            release.wait(30)
        return step()

    llm.engine.step = held_step  # type: ignore[method-assign]

    async def scenario(engine: AsyncLLM) -> None:
        busy = engine.generate("Hello", LONG)
        await anext(busy)
        hold_next.set()
        assert await asyncio.to_thread(entered.wait, 30)
        engine.stats()  # the samples so far, dropped
        start = time.monotonic()
        request = asyncio.ensure_future(last(engine.generate("world", one_token)))
        await asyncio.sleep(0.3)
        release.set()
        await request
        waited = time.monotonic() - start
        await busy.aclose()
        [ttft] = engine.stats().time_to_first_token
        # Stamped as the wait began (a hair after start), not when the engine took the request.
        assert 0.25 <= ttft <= waited, (ttft, waited)

    run_with(llm, scenario)


def test_a_request_cut_short_by_shutdown_counts_as_aborted(model_dir: Path) -> None:
    # Answered 503 as the server stops, but it was accepted and partly served: not a refusal.
    metrics = ServerMetrics()

    async def scenario() -> None:
        engine = AsyncLLM(make_slow_llm(model_dir, step_s=0.01).engine)
        with metrics.counting_request():
            generation = Generation(sampled(engine, [Prompt([5, 6, 7], "")], LONG, "cut"), metrics)
            await generation.start()
            stopping = asyncio.ensure_future(engine.shutdown(drain_timeout=0))
            with pytest.raises(UnavailableError, match="shut down before this request finished"):
                async for _ in generation.outputs():
                    pass
            metrics.count_refusal(503)  # as the error handler answering it does
            await stopping

    asyncio.run(asyncio.wait_for(scenario(), timeout=60))
    counted = metrics.render().decode()
    assert 'neuron_llm_requests_total{outcome="aborted"} 1.0' in counted
    assert 'neuron_llm_requests_total{outcome="rejected"} 0.0' in counted


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_failing_step_fails_the_requests_in_flight_not_the_engine(model_dir: Path, async_scheduling: bool) -> None:
    llm = make_llm(model_dir, async_scheduling=async_scheduling)
    step = llm.engine.step
    failures = iter([RuntimeError("device lost")])

    def failing_step() -> list[RequestOutput]:
        for error in failures:
            raise error
        return step()

    llm.engine.step = failing_step  # type: ignore[method-assign]

    async def scenario(engine: AsyncLLM) -> None:
        with pytest.raises(EngineError, match="device lost"):
            await last(engine.generate("Hello", GREEDY))
        assert engine.is_ready
        await last(engine.generate("Hello", GREEDY))

    run_with(llm, scenario)


def test_an_abort_that_raises_after_a_failed_step_leaves_no_consumer_waiting(model_dir: Path) -> None:
    llm = make_llm(model_dir)
    step, abort = llm.engine.step, llm.engine.abort
    aborts = iter(range(100))

    def failing_step() -> list[RequestOutput]:
        scheduler = llm.engine.scheduler
        if len(scheduler.running) + len(scheduler.waiting) == 6:  # once all six are in
            raise RuntimeError("device lost")
        return step()

    def failing_abort(request_id: str) -> bool:
        if next(aborts) == 1:  # the engine's state is unknown after the failed step
            raise RuntimeError("abort failed")
        return abort(request_id)

    llm.engine.step = failing_step  # type: ignore[method-assign]
    llm.engine.abort = failing_abort  # type: ignore[method-assign]

    async def scenario(engine: AsyncLLM) -> None:
        prompts = [[5, 6, 7, 8 + i] for i in range(6)]
        ends = await asyncio.gather(*(last(engine.generate(p, LONG)) for p in prompts), return_exceptions=True)
        assert all(isinstance(end, EngineError) for end in ends), ends

    run_with(llm, scenario)


def test_a_request_failing_alone_fails_only_its_stream(model_dir: Path) -> None:
    llm = make_llm(model_dir)
    expected = llm.generate(["Hello"], GREEDY)[0].outputs[0].token_ids
    judge = type(llm.engine)._process_token

    def fail_on_goodbye(engine: Any, group: Any, *args: Any, **kwargs: Any) -> None:
        if group.prompt == "Goodbye":
            raise RuntimeError("stop check failed")
        judge(engine, group, *args, **kwargs)

    llm.engine._process_token = fail_on_goodbye.__get__(llm.engine)  # type: ignore[method-assign]

    async def scenario(engine: AsyncLLM) -> None:
        failing, running = engine.generate("Goodbye", GREEDY), engine.generate("Hello", GREEDY)
        finals = await asyncio.gather(last(failing), last(running), return_exceptions=True)
        assert isinstance(finals[0], EngineError) and "stop check failed" in str(finals[0])
        assert isinstance(finals[1], RequestOutput) and finals[1].outputs[0].token_ids == expected
        assert engine.is_ready

    run_with(llm, scenario)


def test_outputs_queued_before_a_failure_reach_the_consumer_before_the_error(model_dir: Path) -> None:
    # A slow consumer finds two outputs and the error waiting: merging must not skip the outputs.
    llm = make_llm(model_dir)
    step = llm.engine.step
    steps_done, failed = [0], threading.Event()

    def step_twice_then_fail() -> list[RequestOutput]:
        if steps_done[0] == 2:
            failed.set()
            raise RuntimeError("device lost")
        steps_done[0] += 1
        return step()

    llm.engine.step = step_twice_then_fail  # type: ignore[method-assign]

    async def scenario(engine: AsyncLLM) -> None:
        outputs = engine.generate("Hello", GREEDY)
        reading = asyncio.ensure_future(anext(outputs))
        await asyncio.sleep(0)  # the request is admitted
        # Hold the event loop until the engine has delivered both outputs and the error.
        assert failed.wait(30)
        while llm.engine.has_unfinished_requests():  # aborted once the error is delivered
            time.sleep(0.001)
        assert len((await reading).outputs[0].token_ids) == 2
        with pytest.raises(EngineError, match="device lost"):
            await anext(outputs)

    run_with(llm, scenario)


def test_a_stalled_consumer_holds_one_output_not_one_a_step(model_dir: Path) -> None:
    # Each output holds the tokens before it: a consumer that stops reading (a slow streaming
    # client) must not pin every step's, which grows with the square of the output's length.
    def alive() -> int:
        gc.collect()
        return sum(type(o) is RequestOutput for o in gc.get_objects())

    async def scenario(engine: AsyncLLM) -> None:
        before = alive()
        outputs = engine.generate("Hello", LONG)
        first = await anext(outputs)
        while engine.num_in_flight and engine.engine.has_unfinished_requests():
            await asyncio.sleep(0.01)  # the loop runs every delivery while nothing is read
        await asyncio.sleep(0.05)
        assert alive() - before <= 3  # the one read, the latest, and one in passing at most
        final = await anext(outputs)
        assert final.finished and len(final.outputs[0].token_ids) == LONG.max_tokens
        assert final.outputs[0].token_ids[: len(first.outputs[0].token_ids)] == first.outputs[0].token_ids

    run_with(make_llm(model_dir), scenario)


_EXIT_WITH_REQUESTS_IN_FLIGHT = """
import asyncio, sys
from tests.serve.conftest import make_llm
from neuron_llm.engine.async_llm import AsyncLLM
from neuron_llm.sampling_params import SamplingParams

llm = make_llm(sys.argv[1])

async def main():
    engine = AsyncLLM(llm.engine)
    async def consume():
        async for _ in engine.generate("Hello", SamplingParams(max_tokens=240, ignore_eos=True)):
            pass
    tasks = [asyncio.create_task(consume()) for _ in range(16)]
    await asyncio.sleep(0.3)
    raise RuntimeError("the script failed")  # no shutdown(): the engine thread is mid-step

asyncio.run(main())
"""


def test_a_script_failing_with_requests_in_flight_exits_with_its_error(model_dir: Path) -> None:
    # Without a stop at exit, the interpreter finalized while the daemon engine thread was inside
    # a torch step, and the process aborted (status 134) instead of exiting with the traceback's 1.
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, "-c", _EXIT_WITH_REQUESTS_IN_FLIGHT, str(model_dir)],
            capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[2],
        )  # fmt: skip
        assert done.returncode == 1, done.stderr[-2000:]
        assert "RuntimeError: the script failed" in done.stderr and "terminate called" not in done.stderr


def test_shutdown_drains_then_aborts_what_is_left(model_dir: Path) -> None:
    # Bounds of sleeps, which load only lengthens: the short request needs 9 steps of 20 ms,
    # the long one at least 4 s.
    llm = make_slow_llm(model_dir, step_s=0.02)

    async def main() -> None:
        engine = AsyncLLM(llm.engine)
        short = asyncio.ensure_future(last(engine.generate("Hello", GREEDY)))
        long = asyncio.ensure_future(last(engine.generate("Hello", LONG)))
        await asyncio.sleep(0)
        await engine.shutdown(drain_timeout=3)
        assert (await short).outputs[0].finish_reason == "length"
        with pytest.raises(EngineClosedError):
            await long
        assert not engine.is_ready
        with pytest.raises(EngineClosedError):
            await anext(engine.generate("Hello", GREEDY))

    asyncio.run(asyncio.wait_for(main(), timeout=60))
    assert not llm.engine.has_unfinished_requests()


def test_a_stalled_consumer_of_deltas_gets_them_joined(model_dir: Path) -> None:
    # Deltas a consumer has not read are joined, not replaced: nothing is lost, the text and
    # logprobs included, and the consumer still holds one output.
    llm = make_llm(model_dir)
    params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True, logprobs=1)
    (expected,) = llm.generate(["Hello"], params)

    async def scenario(engine: AsyncLLM) -> None:
        outputs = engine.generate("Hello", replace(params, output_kind="delta"))
        first = await anext(outputs)
        while engine.num_in_flight and engine.engine.has_unfinished_requests():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        rest = await anext(outputs)
        assert rest.finished and len(first.outputs[0].token_ids) + len(rest.outputs[0].token_ids) == 60
        joined = first.add(rest).outputs[0]
        want = expected.outputs[0]
        assert (joined.text, joined.token_ids, joined.logprobs) == (want.text, want.token_ids, want.logprobs)
        with pytest.raises(StopAsyncIteration):
            await anext(outputs)

    run_with(llm, scenario)


def test_delta_texts_join_into_the_cumulative_text(model_dir: Path) -> None:
    # With a tokenizer: each delta's text is what its step added, a held-back stop string
    # included once released, and the deltas join into the cumulative output.
    llm = make_llm(model_dir)
    free = llm.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))[0].outputs[0].text
    params = SamplingParams(n=2, temperature=0.0, max_tokens=24, ignore_eos=True, stop=[free[10:13]], logprobs=1)
    reports: dict[str, list[RequestOutput]] = {"cumulative": [], "delta": []}
    for kind in reports:
        llm.engine.add_request("Hello", replace(params, output_kind=kind), request_id=kind)
        while llm.engine.has_unfinished_requests():
            for output in llm.engine.step():
                reports[output.request_id].append(output)
    joined = reports["delta"][0]
    for output in reports["delta"][1:]:
        joined = joined.add(output)
    for got, want in zip(joined.outputs, reports["cumulative"][-1].outputs, strict=True):
        assert (got.text, got.token_ids, got.stop_reason) == (want.text, want.token_ids, want.stop_reason)
        assert got.logprobs == want.logprobs
    assert joined.outputs[0].text == free[:10] and joined.outputs[0].finish_reason == "stop"


BEAMS = BeamSearchParams(beam_width=3, max_tokens=12, ignore_eos=True)


def test_a_beam_search_counts_as_one_waiting_request(model_dir: Path) -> None:
    # Its steps run beam_width requests each, which the waiting limit does not hold back.
    llm = make_llm(model_dir)
    (expected,) = llm.beam_search([{"prompt_token_ids": [5, 6, 7]}], BEAMS)

    async def scenario(engine: AsyncLLM) -> None:
        output = await engine.beam_search([5, 6, 7], BEAMS)
        assert [beam.tokens for beam in output.sequences] == [beam.tokens for beam in expected.sequences]
        assert engine.num_in_flight == 0

    run_with(llm, scenario, max_waiting_requests=1)


def test_a_full_waiting_queue_refuses_a_beam_search(model_dir: Path) -> None:
    async def scenario(engine: AsyncLLM) -> None:
        waiting = engine.generate("Hello world", LONG)
        first = asyncio.ensure_future(anext(waiting))
        await asyncio.sleep(0)
        with pytest.raises(QueueFullError):
            await engine.beam_search([5, 6, 7], BEAMS)
        await first
        await waiting.aclose()

    run_with(make_slow_llm(model_dir, step_s=0.2), scenario, max_waiting_requests=1)


def test_shutdown_drains_a_beam_search_between_its_steps(model_dir: Path) -> None:
    llm = make_slow_llm(model_dir, step_s=0.01)

    async def scenario(engine: AsyncLLM) -> None:
        search = asyncio.ensure_future(engine.beam_search([5, 6, 7], BEAMS))
        while engine.num_in_flight < 2:  # the search and its first step's requests
            await asyncio.sleep(0.001)
        await engine.shutdown(drain_timeout=30)
        assert search.done() and len(search.result().sequences) == 3
        with pytest.raises(EngineClosedError, match="accepts no new requests"):
            await engine.beam_search([5, 6, 7], BEAMS)

    run_with(llm, scenario)


def test_a_beam_search_cut_short_by_shutdown_counts_as_aborted(model_dir: Path) -> None:
    metrics = ServerMetrics()

    async def scenario() -> None:
        engine = AsyncLLM(make_slow_llm(model_dir, step_s=0.01).engine)
        params = replace(BEAMS, max_tokens=200)
        with metrics.counting_request():
            generation = Generation(
                beam_searched(engine, [Prompt([5, 6, 7], "")], [params], "cut", None, True), metrics
            )
            starting = asyncio.ensure_future(generation.start())
            while engine.num_in_flight < 2:  # the search and its first step's requests
                await asyncio.sleep(0.001)
            stopping = asyncio.ensure_future(engine.shutdown(drain_timeout=0))
            with pytest.raises(UnavailableError, match="shut down before this request finished"):
                await starting
            metrics.count_refusal(503)  # as the error handler answering it does
            await stopping
        assert engine.num_in_flight == 0

    asyncio.run(asyncio.wait_for(scenario(), timeout=60))
    counted = metrics.render().decode()
    assert 'neuron_llm_requests_total{outcome="aborted"} 1.0' in counted
    assert 'neuron_llm_requests_total{outcome="rejected"} 0.0' in counted

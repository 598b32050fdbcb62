"""Concurrency, clients that leave, a full queue: the server keeps its answers right and its blocks free."""

from __future__ import annotations

import asyncio
import functools
import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from starlette.types import Message

from neuron_llm.engine.async_llm import AsyncLLM
from neuron_llm.llm import LLM
from neuron_llm.outputs import RequestOutput
from neuron_llm.sampling_params import SamplingParams
from neuron_llm.serve import chat, completions
from neuron_llm.serve.generation import EventStreamResponse, Generation, sampled
from neuron_llm.serve.metrics import ServerMetrics
from neuron_llm.serve.prompts import Prompt
from tests.serve.conftest import (
    START_TIMEOUT_S,
    ServerThread,
    leave_once,
    make_llm,
    make_slow_llm,
    metric,
    running_server,
    wait_for,
)

ABORTED = 'neuron_llm_requests_total{outcome="aborted"}'
LONG = {"max_tokens": 240, "ignore_eos": True, "temperature": 0.0}
"""With a slow engine, generation long enough (seconds) for a client to leave in the middle of it."""


@pytest.fixture(scope="module")
def slow_server(model_dir: Path) -> Iterator[ServerThread]:
    with running_server(model_dir, load=lambda: make_slow_llm(model_dir)) as server:
        yield server


def _prompts(count: int) -> list[str]:
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "a",
        "lazy",
        "dog",
        "hello",
        "world",
        "how",
        "are",
        "you",
        "today",
    ]
    return [" ".join(words[(i * 7 + j) % len(words)] for j in range(1 + i % 9)) for i in range(count)]


def test_64_concurrent_streams_match_each_request_alone(server: ServerThread) -> None:
    prompts = _prompts(64)
    name = server.model_name

    async def run() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="-", max_retries=0, timeout=60) as client:
            alone = []
            for prompt in prompts:
                completion = await client.completions.create(model=name, prompt=prompt, temperature=0, max_tokens=10)
                choice = completion.choices[0]
                alone.append((choice.text, choice.finish_reason))

            async def stream(prompt: str) -> tuple[str, str]:
                chunks = await client.completions.create(
                    model=name, prompt=prompt, temperature=0, max_tokens=10, stream=True
                )
                text, finish_reason = "", ""
                async for chunk in chunks:
                    for choice in chunk.choices:
                        text += choice.text
                        finish_reason = choice.finish_reason or finish_reason
                return text, finish_reason

            together = await asyncio.gather(*(stream(prompt) for prompt in prompts))
            return alone, list(together)

    alone, together = asyncio.run(run())
    assert together == alone
    assert all(finish_reason in ("stop", "length") for _, finish_reason in together)


@pytest.mark.parametrize(
    ("route", "slow_body"),
    [
        ("/v1/completions", {"prompt": "SLOW to tokenize"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "SLOW to tokenize"}]}),
    ],
)
def test_a_prompt_being_tokenized_holds_up_no_other_request(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, route: str, slow_body: dict
) -> None:
    # A long prompt takes seconds to tokenize; on the event loop it would stall every stream.
    entered, release = threading.Event(), threading.Event()
    with running_server(model_dir) as server:
        tokenizer = server.app.state.server.ready_model().tokenizer
        encode = tokenizer.encode

        def slow_encode(text: str, *args: object, **kwargs: object) -> list[int]:
            if "SLOW" in text:
                entered.set()
                release.wait(START_TIMEOUT_S)
            return encode(text, *args, **kwargs)

        monkeypatch.setattr(tokenizer, "encode", slow_encode)
        _answers_another_while_held(server, route, slow_body, entered, release)


@pytest.mark.parametrize(
    ("route", "slow_body", "writer", "name"),
    [
        ("/v1/completions", {"prompt": "Hello", "echo": True, "logprobs": 1}, completions, "prompt_text_offsets"),
        (
            "/v1/completions",
            {"prompt": "Hello", "echo": True, "logprobs": 1, "stream": True},
            completions,
            "prompt_text_offsets",
        ),
        ("/v1/completions", {"prompt": "Hello", "prompt_logprobs": 1}, completions, "prompt_logprobs"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "Hi"}], "prompt_logprobs": 1},
            chat,
            "prompt_logprobs",
        ),
    ],
    ids=["echo", "echo-stream", "prompt-logprobs", "chat-prompt-logprobs"],
)
def test_a_long_prompts_logprobs_being_written_hold_up_no_other_request(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, route: str, slow_body: dict, writer: Any, name: str
) -> None:
    # Writing out a long prompt's logprobs takes a while; on the event loop it would stall every stream.
    entered, release = threading.Event(), threading.Event()
    write = getattr(writer, name)

    def slow_write(*args: object, **kwargs: object) -> Any:
        entered.set()
        release.wait(START_TIMEOUT_S)
        return write(*args, **kwargs)

    monkeypatch.setattr(writer, name, slow_write)
    with running_server(model_dir) as server:
        _answers_another_while_held(server, route, slow_body, entered, release)


def _answers_another_while_held(
    server: ServerThread, route: str, slow_body: dict, entered: threading.Event, release: threading.Event
) -> None:
    """Send ``slow_body`` to ``route``; once it is held (``entered``), another request is answered
    while it waits; then it is released and answered too."""
    try:
        with ThreadPoolExecutor(1) as pool:
            body = {**slow_body, "max_tokens": 2}
            slow = pool.submit(httpx.post, f"{server.url}{route}", json=body, timeout=START_TIMEOUT_S)
            assert entered.wait(START_TIMEOUT_S)
            hello = {"prompt": "Hello", "max_tokens": 4}
            other = httpx.post(f"{server.url}/v1/completions", json=hello, timeout=10)
            assert other.status_code == 200, other.text
            assert not slow.done()
            release.set()
            assert slow.result().status_code == 200
    finally:
        release.set()


def test_client_leaving_mid_stream_aborts_its_request(slow_server: ServerThread) -> None:
    server = slow_server
    aborted = metric(server, ABORTED)
    body = {"prompt": "Hello", "stream": True, **LONG}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as response:
        lines = response.iter_lines()  # kept: dropping the iterator would close the connection
        next(line for line in lines if line.startswith("data: "))
        assert metric(server, "neuron_llm_kv_cache_usage_ratio") > 0
    # Counted as aborted only once the app returns, which may be after the blocks are freed.
    wait_for(
        lambda: (
            metric(server, "neuron_llm_kv_cache_usage_ratio") == 0
            and metric(server, "neuron_llm_num_requests_running") == 0
            and metric(server, ABORTED) == aborted + 1
        ),
        "the request was not aborted, or its KV blocks not freed",
    )


def test_client_leaving_before_a_whole_response_aborts_it(slow_server: ServerThread) -> None:
    server = slow_server
    aborted = metric(server, ABORTED)
    running = lambda: metric(server, "neuron_llm_num_requests_running") == 1  # noqa: E731
    leave_once(server, {"prompt": "Hello", **LONG}, running, "the request never ran")
    wait_for(lambda: metric(server, ABORTED) == aborted + 1, "the request was not aborted")
    wait_for(lambda: metric(server, "neuron_llm_kv_cache_usage_ratio") == 0, "KV blocks were not freed")


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
@pytest.mark.parametrize("messages_sent", [0, 3])
def test_a_stream_whose_client_left_ends_quietly_and_aborts_its_request(
    model_dir: Path, spec_version: str, messages_sent: int
) -> None:
    """Before its first byte (Starlette then never iterates the events) or mid-stream, with a
    server whose send raises once the client is gone: the request is aborted, and the
    response ends without an exception the app would answer as a server error."""
    llm = make_slow_llm(model_dir)
    sent: list[Message] = []

    async def send(message: Message) -> None:
        if len(sent) == messages_sent:
            raise OSError("connection reset by peer")
        sent.append(message)

    async def receive() -> Message:
        await asyncio.sleep(60)  # no disconnect message: the server learns of it by sending
        return {"type": "http.disconnect"}

    async def run() -> None:
        engine = AsyncLLM(llm.engine)
        metrics = ServerMetrics()
        try:
            params = SamplingParams(**LONG)
            generation = Generation(sampled(engine, [Prompt([1, 2, 3], "")], params, "cmpl-gone"), metrics)
            await generation.start()
            events = (f"data: {output.outputs[0].text}\n\n" async for _, output in generation.outputs())
            response = EventStreamResponse(events, generation)
            await response({"type": "http", "asgi": {"spec_version": spec_version}}, receive, send)
            assert len(sent) == messages_sent
            assert engine.num_in_flight == 0
            assert f"{ABORTED} 1.0" in metrics.render().decode()
        finally:
            await engine.shutdown(drain_timeout=0)
        assert not llm.engine.has_unfinished_requests()

    asyncio.run(asyncio.wait_for(run(), timeout=60))


def test_more_completions_than_sequences_in_a_step_run_in_turns(model_dir: Path) -> None:
    """n above max_num_seqs runs, as ``LLM`` runs it: the forks wait for room in later steps."""
    load = functools.partial(make_llm, model_dir, max_num_seqs=2)
    with running_server(model_dir, load=load) as server:
        body = {"prompt": "Hello", "n": 5, "max_tokens": 6, "temperature": 1.0, "seed": 3, "ignore_eos": True}
        response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        choices = response.json()["choices"]
        assert sorted(c["index"] for c in choices) == list(range(5))
        assert all(c["finish_reason"] == "length" for c in choices)
        assert len({c["text"] for c in choices}) > 1


def test_full_queue_answers_429_and_keeps_serving(model_dir: Path) -> None:
    # One running slot and one waiting place: a running request A, a waiting B, then C is refused.
    load = functools.partial(make_slow_llm, model_dir, max_num_seqs=1)
    with running_server(model_dir, load=load, max_waiting_requests=1) as server:

        async def run() -> None:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
                body_a = {"prompt": "A", "stream": True, **LONG}
                async with http.stream("POST", "/v1/completions", json=body_a) as stream_a:
                    lines = stream_a.aiter_lines()  # kept: dropping the iterator would close the connection
                    while not (await anext(lines)).startswith("data: "):
                        pass
                    waiting_b = asyncio.create_task(http.post("/v1/completions", json={"prompt": "B", "max_tokens": 4}))
                    await asyncio.to_thread(
                        wait_for, lambda: metric(server, "neuron_llm_num_requests_waiting") == 1, "B never queued"
                    )
                    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="-", max_retries=0)
                    with pytest.raises(openai.RateLimitError) as refused:
                        await client.completions.create(model=server.model_name, prompt="C", max_tokens=4)
                    assert refused.value.body["code"] == "queue_full"
                    assert refused.value.response.headers["retry-after"] == "1"
                # A's client has left, so B runs.
                assert (await waiting_b).status_code == 200
                after = await http.post("/v1/completions", json={"prompt": "D", "max_tokens": 4})
                assert after.status_code == 200

        asyncio.run(run())
        assert metric(server, 'neuron_llm_requests_total{outcome="rejected"}') == 1


def test_engine_failure_fails_its_requests_and_the_server_keeps_serving(model_dir: Path) -> None:
    def load_failing_twice() -> LLM:
        """The first step fails, and later the step after two that produced outputs (mid-stream).

        Counting steps with outputs, not all steps, keeps the second failure mid-stream however
        the client's requests interleave with the engine thread.
        """
        llm = make_llm(model_dir)
        step = llm.engine.step
        outputs_before_failure = [0, 2]

        def flaky_step() -> list[RequestOutput]:
            if outputs_before_failure and outputs_before_failure[0] == 0:
                outputs_before_failure.pop(0)
                raise RuntimeError("device lost")
            outputs = step()
            if outputs and outputs_before_failure:
                outputs_before_failure[0] -= 1
            return outputs

        llm.engine.step = flaky_step  # type: ignore[method-assign]
        return llm

    with running_server(model_dir, load=load_failing_twice) as server:
        whole = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Hello", "max_tokens": 8})
        assert whole.status_code == 500 and "device lost" in whole.json()["error"]["message"]
        body = {"prompt": "Hello", "max_tokens": 8, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as stream:
            events = [line.removeprefix("data: ") for line in stream.iter_lines() if line.startswith("data: ")]
        assert json.loads(events[-2])["error"]["code"] == "engine_error" and events[-1] == "[DONE]"
        after = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Hello", "max_tokens": 8})
        assert after.status_code == 200
        assert metric(server, 'neuron_llm_requests_total{outcome="error"}') == 2


def test_a_bug_is_a_500_counted_once_and_the_connection_lives_on(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request that a bug fails after its generation ended (here, building its logprobs)."""
    from neuron_llm.serve import completions

    def bug(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(completions, "completion_logprobs", bug)
    outcomes = ("success", "aborted", "error")
    with running_server(model_dir) as server, httpx.Client(base_url=server.url) as client:

        def counts() -> dict[str, float]:
            return {o: metric(server, f'neuron_llm_requests_total{{outcome="{o}"}}') for o in outcomes}

        body = {"prompt": "Hello", "max_tokens": 4, "logprobs": 1}
        failed = client.post("/v1/completions", json=body)
        assert failed.status_code == 500 and failed.json()["error"]["type"] == "server_error"
        assert counts() == {"success": 0, "aborted": 0, "error": 1}
        # The same connection serves the next request.
        assert client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 4}).status_code == 200
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as stream:
            events = [line.removeprefix("data: ") for line in stream.iter_lines() if line.startswith("data: ")]
        assert json.loads(events[-2])["error"]["type"] == "server_error" and events[-1] == "[DONE]"
        assert counts() == {"success": 1, "aborted": 0, "error": 2}


def test_a_bug_in_any_route_is_counted_and_a_get_refused_is_not() -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from neuron_llm.serve.errors import ClientError, install_error_handlers

    metrics = ServerMetrics()
    app = FastAPI()
    install_error_handlers(app, metrics)

    @app.get("/v1/models")
    def broken_models() -> None:
        raise RuntimeError("a bug")

    @app.get("/ping")
    def refused_ping() -> None:
        raise ClientError("not ready", status_code=503)

    def count(outcome: str) -> float | None:
        return metrics.registry.get_sample_value("neuron_llm_requests_total", {"outcome": outcome})

    client = TestClient(app, raise_server_exceptions=False)
    assert client.get("/v1/models").status_code == 500
    assert client.get("/ping").status_code == 503
    assert (count("error"), count("rejected")) == (1.0, 0.0)


def test_latency_histograms_miss_no_sample_between_scrapes(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The engine keeps only its latest samples; the server takes them in as they come, so a
    # scrape long after the tokens still counts every one.
    from neuron_llm.engine import llm_engine
    from neuron_llm.serve import app

    # 64 samples kept, fewer than the 116 made; 4 a step of 50 ms give the updater 0.8 s to take them.
    monkeypatch.setattr(llm_engine, "MAX_KEPT_LATENCIES", 64)
    monkeypatch.setattr(app, "METRICS_UPDATE_S", 0.01)
    name = "neuron_llm_inter_token_latency_seconds_count"
    with running_server(model_dir, load=lambda: make_slow_llm(model_dir, step_s=0.05)) as server:
        body = {"prompt": "Hello", "max_tokens": 30, "temperature": 0.0, "ignore_eos": True}
        url = f"{server.url}/v1/completions"
        with ThreadPoolExecutor(4) as pool:
            responses = list(pool.map(lambda _: httpx.post(url, json=body, timeout=60), range(4)))
        assert all(response.status_code == 200 for response in responses)
        assert metric(server, name) == 4 * 29


def test_whole_responses_already_decoding_are_not_waiting(model_dir: Path) -> None:
    # The waiting limit holds requests back until their first token; whole (non-streamed)
    # responses past it must not count against it for the rest of their run.
    load = functools.partial(make_slow_llm, model_dir, step_s=0.01)
    with running_server(model_dir, load=load, max_waiting_requests=2) as server:
        body = {"prompt": "Hello", **LONG}
        with ThreadPoolExecutor(2) as pool:
            running = [pool.submit(httpx.post, f"{server.url}/v1/completions", json=body, timeout=60) for _ in range(2)]
            wait_for(lambda: metric(server, "neuron_llm_num_requests_running") == 2, "the two never ran")
            wait_for(lambda: metric(server, "neuron_llm_generation_tokens_total") > 4, "no tokens came")
            third = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
            assert third.status_code == 200, third.text
            assert all(future.result().status_code == 200 for future in running)

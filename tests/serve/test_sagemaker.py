"""SageMaker's contract: /ping follows the model's load, /invocations answers both body shapes."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import httpx

from neuron_llm.llm import LLM
from tests.serve.conftest import ServerThread, make_llm, metric, running_server, wait_for

REJECTED = 'neuron_llm_requests_total{outcome="rejected"}'
INVALID = 'neuron_llm_requests_total{outcome="invalid"}'


def test_ping_is_503_until_the_model_has_loaded(model_dir: Path) -> None:
    may_load = threading.Event()

    def slow_load() -> LLM:
        assert may_load.wait(timeout=30)
        return make_llm(model_dir)

    with running_server(model_dir, load=slow_load, wait=False) as server:
        assert httpx.get(f"{server.url}/ping").status_code == 503
        assert httpx.get(f"{server.url}/health").json() == {"status": "loading"}
        assert httpx.head(f"{server.url}/health").status_code == 503
        # Polls of the server's state while it loads are not refused requests.
        assert httpx.get(f"{server.url}/v1/models").status_code == 503
        assert metric(server, REJECTED) == 0
        refused = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Hi"})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "model_loading"
        assert refused.headers["retry-after"] == "1"  # worth retrying, unlike a failed load
        assert metric(server, REJECTED) == 1
        may_load.set()
        server.wait_ready()
        assert httpx.get(f"{server.url}/health").json() == {"status": "ready"}
        # A 405 names every method of the path, whichever of its routes Starlette tried.
        assert httpx.put(f"{server.url}/ping").headers["allow"] == "GET, HEAD, POST"
        assert httpx.put(f"{server.url}/health").headers["allow"] == "GET, HEAD"
        # HEAD for load balancers' probes, POST /ping as vLLM takes it.
        assert [
            httpx.request(method, f"{server.url}{path}").status_code
            for method, path in (("HEAD", "/health"), ("HEAD", "/ping"), ("POST", "/ping"))
        ] == [200, 200, 200]


def test_ping_stays_503_when_loading_fails(model_dir: Path) -> None:
    def broken_load() -> LLM:
        raise FileNotFoundError("no weights here")

    with running_server(model_dir, load=broken_load, wait=False) as server:
        wait_for(lambda: httpx.get(f"{server.url}/health").json()["status"] != "loading", "load never ended")
        health = httpx.get(f"{server.url}/health")
        assert health.status_code == 503 and health.json() == {"status": "failed"}
        assert httpx.get(f"{server.url}/ping").status_code == 503
        failed = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Hi"})
        assert "no weights here" in failed.json()["error"]["message"]
        assert "retry-after" not in failed.headers


def test_invocations_answers_tgi_bodies_as_tgi(server: ServerThread) -> None:
    body = {"inputs": "Hello world", "parameters": {"max_new_tokens": 6, "details": True, "return_full_text": True}}
    response = httpx.post(f"{server.url}/invocations", json=body)
    assert response.status_code == 200
    (generation,) = response.json()
    assert generation["generated_text"].startswith("Hello world")
    assert generation["details"]["finish_reason"] in ("length", "eos_token")
    assert 1 <= generation["details"]["generated_tokens"] <= 6
    # Greedy unless asked to sample: the same text as an OpenAI greedy completion.
    plain = httpx.post(f"{server.url}/invocations", json={"inputs": "Hello world", "parameters": {"max_new_tokens": 6}})
    openai_style = httpx.post(
        f"{server.url}/v1/completions", json={"prompt": "Hello world", "max_tokens": 6, "temperature": 0}
    )
    assert plain.json()[0]["generated_text"] == openai_style.json()["choices"][0]["text"]
    bad = httpx.post(f"{server.url}/invocations", json={"inputs": "Hi", "parameters": {"temperature": 0}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "parameters.temperature"


def test_tgi_samples_only_when_a_setting_changes_the_distribution(server: ServerThread) -> None:
    def generate(**parameters: Any) -> str:
        body = {"inputs": "Hello world", "parameters": {"max_new_tokens": 8, **parameters}}
        response = httpx.post(f"{server.url}/invocations", json=body)
        assert response.status_code == 200, response.text
        return response.json()[0]["generated_text"]

    greedy = generate()
    # As TGI: a temperature of 1 or a top_p of 1 leaves decoding greedy, even with a seed.
    assert generate(temperature=1.0, seed=1) == greedy
    assert generate(temperature=1.0, top_p=1.0, do_sample=False, seed=2) == greedy
    sampled = {generate(do_sample=True, seed=seed) for seed in range(3)}
    assert sampled != {greedy}

    def details(**parameters: Any) -> dict[str, Any]:
        body = {"inputs": "Hello world", "parameters": {"max_new_tokens": 2, "details": True, **parameters}}
        return httpx.post(f"{server.url}/invocations", json=body).json()[0]["details"]

    assert details(do_sample=True, seed=5)["seed"] == 5
    assert "seed" not in details(seed=5)  # greedy: no seed drew anything


def test_tgi_text_keeps_the_stop_sequence_that_ended_it(server: ServerThread) -> None:
    def generate(**parameters: Any) -> dict[str, Any]:
        body = {"inputs": "Hello world", "parameters": {"max_new_tokens": 12, "details": True, **parameters}}
        response = httpx.post(f"{server.url}/invocations", json=body)
        assert response.status_code == 200, response.text
        return response.json()[0]

    free = generate()["generated_text"]
    stop = free[len(free) // 2 : len(free) // 2 + 2]
    stopped = generate(stop=[stop])
    assert stopped["details"]["finish_reason"] == "stop_sequence"
    assert stopped["generated_text"].endswith(stop) and free.startswith(stopped["generated_text"])


def test_invocations_answers_openai_bodies_as_openai(server: ServerThread) -> None:
    completion = httpx.post(f"{server.url}/invocations", json={"prompt": "Hello", "max_tokens": 4}).json()
    assert completion["object"] == "text_completion" and completion["usage"]["completion_tokens"] >= 1
    chat = httpx.post(
        f"{server.url}/invocations", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    ).json()
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["role"] == "assistant"
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{server.url}/invocations", json=body) as stream:
        events = [line.removeprefix("data: ") for line in stream.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert all(json.loads(event)["object"] == "chat.completion.chunk" for event in events[:-1])


def test_invocations_serve_the_endpoints_model_whatever_name_a_body_carries(server: ServerThread) -> None:
    """/v1 routes refuse another model's name; an endpoint has one model, and clients of other
    containers name theirs ("tgi")."""
    body = {"model": "tgi", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    assert httpx.post(f"{server.url}/v1/chat/completions", json=body).status_code == 404
    reply = httpx.post(f"{server.url}/invocations", json=body)
    assert reply.status_code == 200 and reply.json()["model"] == server.model_name
    completion = httpx.post(f"{server.url}/invocations", json={"model": "other", "prompt": "Hi", "max_tokens": 2})
    assert completion.status_code == 200 and completion.json()["object"] == "text_completion"

"""Bad input gets a 4xx naming the field; generated input (schemathesis) never gets a 5xx."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.serve.conftest import ServerThread, make_llm, running_server

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "Hi"}]

BAD_BODIES = [
    # wrong types
    (COMPLETIONS, {"prompt": 5}, 400, "prompt"),
    (COMPLETIONS, {"prompt": ["a", 1]}, 400, "prompt"),
    (COMPLETIONS, {"prompt": "a", "max_tokens": "ten"}, 400, "max_tokens"),
    (COMPLETIONS, {"prompt": "a", "n": True}, 400, "n"),
    (COMPLETIONS, {"prompt": "a", "temperature": "hot"}, 400, "temperature"),
    (COMPLETIONS, {"prompt": "a", "stream": "yes"}, 400, "stream"),
    (COMPLETIONS, {"prompt": "a", "stop": 3}, 400, "stop"),
    (
        CHAT,
        {"messages": USER, "stream": True, "stream_options": {"include_usage": 1}},
        400,
        "stream_options.include_usage",
    ),
    (CHAT, {"messages": "Hi"}, 400, "messages"),
    (CHAT, {"messages": [{"role": "user", "content": 3}]}, 400, "messages[0].content"),
    # negative or out of range
    (COMPLETIONS, {"prompt": "a", "max_tokens": -1}, 400, "max_tokens"),
    (COMPLETIONS, {"prompt": "a", "n": 0}, 400, "n"),
    (COMPLETIONS, {"prompt": "a", "logprobs": -1}, 400, "logprobs"),
    (COMPLETIONS, {"prompt": "a", "top_k": -5}, 400, "top_k"),
    (COMPLETIONS, {"prompt": "a", "top_p": 0}, 400, "top_p"),
    (COMPLETIONS, {"prompt": "a", "presence_penalty": -3}, 400, "presence_penalty"),
    (CHAT, {"messages": USER, "top_logprobs": 99, "logprobs": True}, 400, "top_logprobs"),
    # options that would do nothing
    (CHAT, {"messages": USER, "top_logprobs": 2}, 400, "top_logprobs"),
    (COMPLETIONS, {"prompt": "a", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    # huge
    (COMPLETIONS, {"prompt": "a", "max_tokens": 10**12}, 400, "max_tokens"),
    (CHAT, {"messages": USER, "max_completion_tokens": 10**6}, 400, "max_completion_tokens"),
    (COMPLETIONS, {"prompt": "a", "n": 10**6}, 400, "n"),
    (COMPLETIONS, {"prompt": "a", "n": 100}, 400, "n"),
    (COMPLETIONS, {"prompt": "a", "seed": 2**70}, 400, "seed"),
    (COMPLETIONS, {"prompt": [10**9]}, 400, "prompt"),
    (COMPLETIONS, {"prompt": "word " * 1000}, 400, "prompt"),
    # empty
    (COMPLETIONS, {"prompt": ""}, 400, "prompt"),
    (COMPLETIONS, {"prompt": []}, 400, "prompt"),
    (COMPLETIONS, {"prompt": ["a", ""]}, 400, "prompt[1]"),
    (COMPLETIONS, {"prompt": "a", "stop": [""]}, 400, "stop"),
    (CHAT, {"messages": []}, 400, "messages"),
    (CHAT, {"messages": [{"role": "user"}]}, 400, "messages[0].content"),
    # unknown
    (CHAT, {"messages": [{"role": "wizard", "content": "Hi"}]}, 400, "messages[0].role"),
    (COMPLETIONS, {"prompt": "a", "logit_bias": {"1": 5}}, 400, "logit_bias"),
    (COMPLETIONS, {"prompt": "a", "model": "gpt-4"}, 404, "model"),
    (CHAT, {"messages": USER, "model": "gpt-4"}, 404, "model"),
    ("/invocations", {"inputs": "Hi", "parameters": {"max_new_tokens": 0}}, 400, "parameters.max_new_tokens"),
    ("/invocations", {"inputs": "Hi", "parameters": {"typical_p": 0.5}}, 400, "parameters.typical_p"),
    ("/invocations", {"inputs": ""}, 400, "inputs"),
    ("/invocations", {"messages": [{"role": "wizard", "content": "Hi"}]}, 400, "messages[0].role"),
]


@pytest.mark.parametrize(("route", "body", "status", "param"), BAD_BODIES)
def test_bad_field_is_a_4xx_naming_it(server: ServerThread, route: str, body: Any, status: int, param: str) -> None:
    response = httpx.post(f"{server.url}{route}", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    assert set(error) == {"message", "type", "param", "code"} and error["message"]


def test_null_options_take_their_defaults(server: ServerThread) -> None:
    # OpenAI's API lets a client send null for an option it leaves unset.
    unset = dict.fromkeys(("n", "temperature", "top_p", "presence_penalty", "frequency_penalty", "stream", "seed"))
    completion = httpx.post(f"{server.url}{COMPLETIONS}", json={"prompt": "a", "max_tokens": 2, "echo": None, **unset})
    assert completion.status_code == 200, completion.text
    assert len(completion.json()["choices"]) == 1 and completion.json()["choices"][0]["logprobs"] is None
    chat = httpx.post(f"{server.url}{CHAT}", json={"messages": USER, "max_tokens": 2, "logprobs": None, **unset})
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["logprobs"] is None


@pytest.mark.parametrize("content", [b"{not json", b"", b"[1, 2]", b'"prompt"', b"\xff\xfe"])
def test_malformed_body_is_a_400(server: ServerThread, content: bytes) -> None:
    response = httpx.post(f"{server.url}{COMPLETIONS}", content=content, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_unknown_route_and_method_answer_in_openai_shape(server: ServerThread) -> None:
    assert httpx.get(f"{server.url}/v1/nothing").json()["error"]["message"]
    assert httpx.get(f"{server.url}{COMPLETIONS}").status_code == 405


@pytest.fixture(scope="module")
def fuzz_server(model_dir: Path) -> Iterator[ServerThread]:
    # A short context and few sequences bound the work any generated request can ask for.
    with running_server(model_dir, load=lambda: make_llm(model_dir, max_model_len=64, max_num_seqs=4)) as server:
        yield server


FUZZ_EXAMPLES = 30
FUZZ_BUDGET_S = 45.0


def test_schemathesis_finds_no_server_error(fuzz_server: ServerThread) -> None:
    import hypothesis
    import schemathesis
    from schemathesis.generation.modes import GenerationMode

    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    deadline = time.monotonic() + FUZZ_BUDGET_S
    server_errors: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 7
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
            @hypothesis.settings(
                max_examples=FUZZ_EXAMPLES,
                deadline=None,
                database=None,
                derandomize=True,
                phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
                suppress_health_check=list(hypothesis.HealthCheck),
            )
            def check(case: Any) -> None:
                if time.monotonic() > deadline:
                    return
                response = case.call(base_url=fuzz_server.url, timeout=30)
                if response.status_code >= 500:
                    server_errors.append(f"{case.method} {case.path} {case.body!r} -> {response.status_code}")

            try:
                check()
            except hypothesis.errors.Unsatisfiable:
                # An operation without inputs (GET /ping) has no invalid request to make.
                assert mode is GenerationMode.NEGATIVE and operation.method.upper() == "GET"
    assert not server_errors, server_errors[:5]
    assert time.monotonic() < deadline, "the fuzzing budget ran out before every operation was tried"

"""Bad input gets a 4xx naming the field; generated input (schemathesis) never gets a 5xx."""

from __future__ import annotations

import asyncio
import functools
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from neuron_llm.sampling_params import (
    MAX_BAD_WORD_CHARS,
    MAX_BAD_WORDS,
    MAX_LOGIT_BIAS,
    MAX_STOP_TOKEN_IDS,
    SamplingParams,
)
from neuron_llm.serve import ServeSettings, create_app
from neuron_llm.serve.protocol import MAX_STOP, MAX_STOP_CHARS
from tests.engine.conftest import tiny_model_dir  # noqa: F401
from tests.serve.conftest import ServerThread, make_llm, metric, running_server, unmerged_characters

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "Hi"}]
TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
NESTED = functools.reduce(lambda inner, _: [inner], range(500), [])

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
    (COMPLETIONS, {"prompt": "a", "seed": 2**70}, 400, "seed"),
    (COMPLETIONS, {"prompt": [10**9]}, 400, "prompt"),
    (COMPLETIONS, {"prompt": "word " * 1000}, 400, "prompt"),
    (COMPLETIONS, {"prompt": ["a", "word " * 1000]}, 400, "prompt[1]"),
    (COMPLETIONS, {"prompt": "a", "stop": ["x"] * (MAX_STOP + 1)}, 400, "stop"),
    (COMPLETIONS, {"prompt": "a", "stop": "x" * (MAX_STOP_CHARS + 1)}, 400, "stop"),
    (CHAT, {"messages": USER, "stop": ["a", "x" * (MAX_STOP_CHARS + 1)]}, 400, "stop"),
    ("/invocations", {"inputs": "Hi", "parameters": {"stop": ["x"] * (MAX_STOP + 1)}}, 400, "parameters.stop"),
    # empty
    (COMPLETIONS, {"prompt": ""}, 400, "prompt"),
    (COMPLETIONS, {"prompt": []}, 400, "prompt"),
    (COMPLETIONS, {"prompt": ["a", ""]}, 400, "prompt[1]"),
    (COMPLETIONS, {"prompt": "a", "stop": [""]}, 400, "stop"),
    (CHAT, {"messages": []}, 400, "messages"),
    (CHAT, {"messages": [{"role": "user"}]}, 400, "messages[0].content"),
    # unknown
    (CHAT, {"messages": [{"role": "wizard", "content": "Hi"}]}, 400, "messages[0].role"),
    (CHAT, {"messages": [{"role": "user", "content": "Hi", "mood": "x"}]}, 400, "messages[0].mood"),
    (COMPLETIONS, {"prompt": "a", "logit_bias": {"1": 500}}, 400, "logit_bias.1"),
    (COMPLETIONS, {"prompt": "a", "logit_bias": {"x": 5}}, 400, "logit_bias"),
    (COMPLETIONS, {"prompt": "a", "stop_token_ids": list(range(MAX_STOP_TOKEN_IDS + 1))}, 400, "stop_token_ids"),
    (CHAT, {"messages": USER, "stop_token_ids": [1] * (MAX_STOP_TOKEN_IDS + 1)}, 400, "stop_token_ids"),
    (COMPLETIONS, {"prompt": "a", "logit_bias": {"-1": 5}}, 400, "logit_bias"),
    (COMPLETIONS, {"prompt": "a", "logit_bias": {str(i): 1 for i in range(MAX_LOGIT_BIAS + 1)}}, 400, "logit_bias"),
    (CHAT, {"messages": USER, "logit_bias": {"1": 5, "10000000": -5}}, 400, "logit_bias"),
    (COMPLETIONS, {"prompt": "a", "allowed_token_ids": []}, 400, "allowed_token_ids"),
    (COMPLETIONS, {"prompt": "a", "allowed_token_ids": [-1]}, 400, "allowed_token_ids[0]"),
    (CHAT, {"messages": USER, "allowed_token_ids": [1, 10000000]}, 400, "allowed_token_ids"),
    (COMPLETIONS, {"prompt": "a", "bad_words": [""]}, 400, "bad_words[0]"),
    (CHAT, {"messages": USER, "bad_words": ["  "]}, 400, "bad_words"),
    (COMPLETIONS, {"prompt": "a", "bad_words": ["w"] * (MAX_BAD_WORDS + 1)}, 400, "bad_words"),
    (CHAT, {"messages": USER, "bad_words": ["w", "w" * (MAX_BAD_WORD_CHARS + 1)]}, 400, "bad_words[1]"),
    (COMPLETIONS, {"prompt": "a", "best_of": 2}, 400, "best_of"),
    (COMPLETIONS, {"prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    (COMPLETIONS, {"prompt": "a", "max_tokens": 0, "echo": True, "min_tokens": 2}, 400, "max_tokens"),
    (CHAT, {"messages": USER, "tools": [{"type": "function"}]}, 400, "tools[0].function"),
    (CHAT, {"messages": USER, "tools": [TOOL, TOOL]}, 400, "tools"),
    (
        CHAT,
        {"messages": USER, "tools": [{"type": "function", "function": {"name": "a b"}}]},
        400,
        "tools[0].function.name",
    ),
    (CHAT, {"messages": USER, "tool_choice": "required"}, 400, "tool_choice"),
    (
        CHAT,
        {"messages": USER, "tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "f"}}},
        400,
        "tool_choice",
    ),
    (CHAT, {"messages": USER, "tools": [TOOL], "tool_choice": "any"}, 400, "tool_choice"),
    (CHAT, {"messages": [{"role": "user", "tool_calls": [CALL]}]}, 400, "messages[0].tool_calls"),
    (
        CHAT,
        {"messages": [{"role": "assistant", "tool_calls": [{**CALL, "function": {"name": "g", "arguments": "{"}}]}]},
        400,
        "messages[0].tool_calls",
    ),
    (CHAT, {"messages": USER, "functions": [TOOL["function"]]}, 400, "functions"),
    # values the chat template fails on: nested past Python's recursion limit where rendered
    (CHAT, {"messages": USER, "chat_template_kwargs": {"x": NESTED}}, 400, "messages"),
    ("/invocations", {"messages": USER, "chat_template_kwargs": {"x": NESTED}}, 400, "messages"),
    (CHAT, {"messages": USER, "store": 0}, 400, "store"),
    ("/invocations", {"inputs": "Hi", "parameters": {"watermark": True}}, 400, "parameters.watermark"),
    (COMPLETIONS, {"prompt": "a", "model": "gpt-4"}, 404, "model"),
    (CHAT, {"messages": USER, "model": "gpt-4"}, 404, "model"),
    ("/invocations", {"inputs": "Hi", "parameters": {"max_new_tokens": 0}}, 400, "parameters.max_new_tokens"),
    ("/invocations", {"inputs": "Hi", "parameters": {"typical_p": 0.5}}, 400, "parameters.typical_p"),
    ("/invocations", {"inputs": ""}, 400, "inputs"),
    ("/invocations", {"messages": [{"role": "wizard", "content": "Hi"}]}, 400, "messages[0].role"),
    ("/invocations", {"inputs": "Hi", "stream": True}, 400, "stream"),
    ("/invocations", [1, 2], 400, None),
]


@pytest.mark.parametrize(("route", "body", "status", "param"), BAD_BODIES)
def test_bad_field_is_a_4xx_naming_it(
    server: ServerThread, route: str, body: Any, status: int, param: str | None
) -> None:
    response = httpx.post(f"{server.url}{route}", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    assert set(error) == {"message", "type", "param", "code"} and error["message"]


def test_bad_words_that_leave_no_token_partway_are_a_400_naming_them(server: ServerThread) -> None:
    ids, words = unmerged_characters(server.app.state.server.ready_model().tokenizer)
    body = {"prompt": "Hello", "max_tokens": 8, "allowed_token_ids": ids, "bad_words": words}
    reply = httpx.post(f"{server.url}{COMPLETIONS}", json=body, timeout=60)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "bad_words", reply.text
    assert "at output token 2 they ban every token left by allowed_token_ids" in reply.json()["error"]["message"]


def test_a_content_part_other_than_text_is_refused_in_plain_words(server: ServerThread) -> None:
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    for route in (CHAT, "/invocations"):
        body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]}]}
        error = httpx.post(f"{server.url}{route}", json=body).json()["error"]
        assert error["param"] == "messages[0].content", error
        assert error["message"] == (
            "messages[0].content: a content part of type 'image_url': this server takes text parts only"
        )
    # An unknown field of a text part is named by its path, not by pydantic's union member.
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi", "mood": "x"}]}]}
    error = httpx.post(f"{server.url}{CHAT}", json=body).json()["error"]
    assert error["param"] == "messages[0].content[0].mood", error


def test_a_tgi_prompt_filling_the_context_is_refused_as_too_long(server: ServerThread) -> None:
    # Without max_new_tokens the default output length is what the prompt leaves: none here.
    tokenizer = server.app.state.server.ready_model().tokenizer
    context = server.app.state.server.ready_model().max_model_len
    texts = ("x" * n for n in range(1, 2 * context))
    inputs = next(text for text in texts if len(tokenizer.encode(text)) == context)
    response = httpx.post(f"{server.url}/invocations", json={"inputs": inputs})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("inputs", "context_length_exceeded"), error
    room = httpx.post(f"{server.url}/invocations", json={"inputs": inputs[3:], "parameters": {"details": True}})
    assert room.status_code == 200, room.text
    assert room.json()[0]["details"]["generated_tokens"] >= 1


def test_null_options_take_their_defaults(server: ServerThread) -> None:
    # OpenAI's API lets a client send null for an option it leaves unset.
    unset = dict.fromkeys(("n", "temperature", "top_p", "presence_penalty", "frequency_penalty", "stream", "seed"))
    completion = httpx.post(f"{server.url}{COMPLETIONS}", json={"prompt": "a", "max_tokens": 2, "echo": None, **unset})
    assert completion.status_code == 200, completion.text
    assert len(completion.json()["choices"]) == 1 and completion.json()["choices"][0]["logprobs"] is None
    chat = httpx.post(f"{server.url}{CHAT}", json={"messages": USER, "max_tokens": 2, "logprobs": None, **unset})
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["logprobs"] is None


def test_options_sent_switched_off_are_accepted(server: ServerThread) -> None:
    # Clients that send every field send the options this server lacks too, set to off.
    completion = {"prompt": "a", "max_tokens": 2, "logit_bias": {}, "best_of": 1, "suffix": None}
    assert httpx.post(f"{server.url}{COMPLETIONS}", json=completion).status_code == 200
    off = {"response_format": {"type": "text"}, "tools": [], "tool_choice": "none", "store": False, "metadata": None}
    # So do OpenAI's annotations, which change nothing here.
    off |= {"metadata": {"team": "a"}, "prompt_cache_key": "k", "safety_identifier": "u1", "user": "u"}
    chat = httpx.post(f"{server.url}{CHAT}", json={"messages": USER, "max_tokens": 2, "logit_bias": None, **off})
    assert chat.status_code == 200, chat.text
    parameters = {"max_new_tokens": 2, "watermark": False, "best_of": 1, "decoder_input_details": False}
    tgi = httpx.post(f"{server.url}/invocations", json={"inputs": "Hi", "parameters": {**parameters, "truncate": None}})
    assert tgi.status_code == 200, tgi.text


def test_messages_name_fields_as_the_request_does(server: ServerThread) -> None:
    body = {"messages": USER, "max_completion_tokens": 2, "min_tokens": 5}
    error = httpx.post(f"{server.url}{CHAT}", json=body).json()["error"]
    assert error["param"] == "min_tokens" and "max_completion_tokens=2" in error["message"], error
    body = {"prompt": ["a", "word " * 1000], "max_tokens": 2}
    error = httpx.post(f"{server.url}{COMPLETIONS}", json=body).json()["error"]
    assert error["message"].startswith("prompt[1] is ") and error["code"] == "context_length_exceeded", error


def test_a_body_not_sent_as_json_is_a_415_naming_the_content_type(server: ServerThread) -> None:
    body = b'{"prompt": "a", "max_tokens": 2}'
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {} if content_type is None else {"content-type": content_type}
        response = httpx.post(f"{server.url}{COMPLETIONS}", content=body, headers=headers)
        assert response.status_code == 415, response.text
        assert "Content-Type: application/json" in response.json()["error"]["message"]
    # SageMaker's SDK sends its bodies as octet-stream unless told otherwise; InvokeEndpoint
    # may name no content type at all.
    tgi_body = b'{"inputs": "Hi", "parameters": {"max_new_tokens": 2}}'
    untyped = httpx.post(f"{server.url}/invocations", content=tgi_body)
    assert untyped.status_code == 200 and "generated_text" in untyped.json()[0], untyped.text
    headers = {"content-type": "application/octet-stream"}
    tgi = httpx.post(f"{server.url}/invocations", content=tgi_body, headers=headers)
    assert tgi.status_code == 200 and "generated_text" in tgi.json()[0], tgi.text
    assert httpx.post(f"{server.url}{COMPLETIONS}", content=body, headers=headers).status_code == 415
    bad = httpx.post(f"{server.url}/invocations", content=b'{"inputs": ""}', headers=headers)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "inputs"
    # Read as JSON, its faults are those of a JSON body.
    body = b'{"inputs": "Hi", "parameters": {"max_new_tokens": 0}}'
    bad = httpx.post(f"{server.url}/invocations", content=body, headers=headers)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "parameters.max_new_tokens", bad.text
    bad = httpx.post(f"{server.url}/invocations", content=b"{not json", headers=headers)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json", bad.text


def test_text_whose_tokens_the_model_lacks_is_a_400(extra_token_model_dir: Path) -> None:
    with running_server(extra_token_model_dir) as server:
        completion = httpx.post(f"{server.url}{COMPLETIONS}", json={"prompt": ["Hi", "Hi <extra>"]})
        assert completion.status_code == 400 and completion.json()["error"]["param"] == "prompt[1]", completion.text
        messages = [{"role": "user", "content": "<extra>"}]
        chat = httpx.post(f"{server.url}{CHAT}", json={"messages": messages})
        assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages", chat.text
        assert httpx.post(f"{server.url}{COMPLETIONS}", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200


def test_an_empty_text_is_a_prompt_where_the_tokenizer_adds_bos(model_dir: Path, tmp_path: Path) -> None:
    # vLLM refuses only a prompt of no tokens; "" with a BOS-adding tokenizer is one token.
    from transformers import AutoTokenizer

    shutil.copytree(model_dir, tmp_path, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.bos_token = "<|system|>"
    tokenizer.add_bos_token = True
    tokenizer.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).encode("") == [tokenizer.bos_token_id]
    [offline] = make_llm(tmp_path).generate("", SamplingParams(max_tokens=2))
    assert offline.prompt_token_ids == [tokenizer.bos_token_id] and len(offline.outputs[0].token_ids) == 2
    with pytest.raises(ValueError, match="prompt is empty"):
        make_llm(model_dir).generate("", SamplingParams(max_tokens=2))  # no BOS: no tokens
    with running_server(tmp_path) as server:
        for route, body in [
            (COMPLETIONS, {"prompt": "", "max_tokens": 2}),
            (COMPLETIONS, {"prompt": ["Hi", ""], "max_tokens": 2}),
            ("/invocations", {"inputs": "", "parameters": {"max_new_tokens": 2}}),
        ]:
            response = httpx.post(f"{server.url}{route}", json=body, timeout=60)
            assert response.status_code == 200, (route, body, response.text)
        response = httpx.post(f"{server.url}{COMPLETIONS}", json={"prompt": "", "max_tokens": 2}, timeout=60)
        assert response.json()["usage"]["prompt_tokens"] == 1
        empty = httpx.post(f"{server.url}{COMPLETIONS}", json={"prompt": [], "max_tokens": 2}, timeout=60)
        assert empty.status_code == 400 and empty.json()["error"]["param"] == "prompt", empty.text


def test_stop_strings_without_a_tokenizer_are_a_400_naming_stop(tiny_model_dir: Path) -> None:  # noqa: F811
    with running_server(tiny_model_dir) as server:
        body = {"prompt": [5, 6, 7], "max_tokens": 2, "stop": ["x"]}
        response = httpx.post(f"{server.url}{COMPLETIONS}", json=body)
        assert response.status_code == 400 and response.json()["error"]["param"] == "stop", response.text
        assert "stop_token_ids" in response.json()["error"]["message"]
        body = {"prompt": [5, 6, 7], "max_tokens": 2, "stop_token_ids": [9]}
        assert httpx.post(f"{server.url}{COMPLETIONS}", json=body).status_code == 200


@pytest.mark.parametrize("content", [b"{not json", b"", b"[1, 2]", b'"prompt"', b"\xff\xfe"])
def test_malformed_body_is_a_400(server: ServerThread, content: bytes) -> None:
    response = httpx.post(f"{server.url}{COMPLETIONS}", content=content, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_a_body_that_is_not_utf8_is_a_400_saying_so(server: ServerThread) -> None:
    invalid = metric(server, 'neuron_llm_requests_total{outcome="invalid"}')
    content = b'{"prompt": "caf\xe9", "max_tokens": 2}'  # Latin-1
    response = httpx.post(f"{server.url}{COMPLETIONS}", content=content, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert "not UTF-8" in error["message"] and "0xe9" in error["message"] and error["code"] == "invalid_json"
    assert metric(server, 'neuron_llm_requests_total{outcome="invalid"}') == invalid + 1


def test_a_client_leaving_while_its_body_is_read_is_no_invalid_request(model_dir: Path) -> None:
    # FastAPI answers a body it could not finish reading as a 400; the client is gone, so it
    # is a 499, as when it leaves later, and counted as nothing.
    app = create_app(ServeSettings(model=str(model_dir)), load=lambda: pytest.fail("not loaded"))
    messages = iter(
        [{"type": "http.request", "body": b'{"prompt": "He', "more_body": True}, {"type": "http.disconnect"}]
    )
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return next(messages)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    headers = [(b"content-type", b"application/json"), (b"content-length", b"100")]
    scope = {"type": "http", "method": "POST", "path": COMPLETIONS, "headers": headers, "query_string": b""}
    asyncio.run(app({**scope, "asgi": {"version": "3.0"}, "http_version": "1.1", "scheme": "http"}, receive, send))
    assert sent[0]["status"] == 499
    assert 'neuron_llm_requests_total{outcome="invalid"} 0.0' in app.state.server.metrics.render().decode()


def test_a_body_over_the_limit_is_a_413_after_the_key_check(model_dir: Path) -> None:
    key = {"Authorization": "Bearer k"}
    with running_server(model_dir, api_key="k", max_request_bytes=1000) as server:
        url = f"{server.url}{COMPLETIONS}"
        big = {"prompt": "Hello " * 200, "max_tokens": 2}
        assert httpx.post(url, json=big).status_code == 401
        refused = httpx.post(url, json=big, headers=key)
        assert refused.status_code == 413, refused.text
        assert "1000 bytes" in refused.json()["error"]["message"]
        assert refused.json()["error"]["code"] == "request_too_large"

        # Sent in chunks, without a Content-Length: refused once the limit has been read.
        def chunks() -> Iterator[bytes]:
            yield json.dumps(big).encode()

        chunked = httpx.post(url, content=chunks(), headers={**key, "content-type": "application/json"})
        assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "request_too_large"
        assert metric(server, 'neuron_llm_requests_total{outcome="invalid"}') == 3  # the 401 too
        assert httpx.post(url, json={"prompt": "Hello", "max_tokens": 2}, headers=key).status_code == 200


def test_unknown_route_and_method_answer_in_openai_shape_uncounted(server: ServerThread) -> None:
    invalid = metric(server, 'neuron_llm_requests_total{outcome="invalid"}')
    assert httpx.get(f"{server.url}/v1/nothing").json()["error"]["message"]
    wrong_method = httpx.get(f"{server.url}{COMPLETIONS}")
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    # Probes and scanners are not requests of the API.
    assert metric(server, 'neuron_llm_requests_total{outcome="invalid"}') == invalid


def test_invocations_say_what_a_body_must_be(server: ServerThread) -> None:
    for body, words in (([1, 2], "the body must be a JSON object"), ({"inputs": "Hi", "stream": True}, "to stream")):
        assert words in httpx.post(f"{server.url}/invocations", json=body).json()["error"]["message"]


def test_a_number_that_is_not_finite_is_named_as_such(server: ServerThread) -> None:
    # Python's JSON reads NaN, which a range check alone would call "not <= 2".
    content = '{"prompt": "a", "frequency_penalty": NaN}'
    response = httpx.post(f"{server.url}{COMPLETIONS}", content=content, headers={"content-type": "application/json"})
    error = response.json()["error"]
    assert error["param"] == "frequency_penalty" and "finite" in error["message"], error


def test_each_unknown_field_is_named(server: ServerThread) -> None:
    body = {"messages": [{"role": "user", "content": "Hi", "mood": "x", "tone": "y"}]}
    error = httpx.post(f"{server.url}{CHAT}", json=body).json()["error"]
    assert "messages[0].mood, messages[0].tone" in error["message"], error


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        (COMPLETIONS, {"prompt": "cut \ud83d"}, "prompt"),
        (CHAT, {"messages": [{"role": "user", "content": "cut \ud83d"}]}, "messages"),
        ("/invocations", {"inputs": "cut \ud83d"}, "inputs"),
    ],
)
def test_half_a_surrogate_pair_is_a_400_and_the_connection_lives_on(
    server: ServerThread, route: str, body: dict[str, Any], param: str
) -> None:
    # JSON can carry "\ud83d" (a string cut inside an emoji); no UTF-8 encodes it.
    with httpx.Client(base_url=server.url) as client:
        headers = {"content-type": "application/json"}
        refused = client.post(route, content=json.dumps(body), headers=headers)
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["param"] == param and "surrogate" in refused.json()["error"]["message"]
        assert client.post(COMPLETIONS, json={"prompt": "Hi", "max_tokens": 2}).status_code == 200


def test_a_batch_prompt_too_long_for_an_unchunked_step_is_refused_before_any_answer(model_dir: Path) -> None:
    # The engine refuses it too, but only as it adds it: the batch's first prompt could already
    # have streamed its first tokens, under a 200.
    load = lambda: make_llm(model_dir, enable_chunked_prefill=False, max_num_batched_tokens=64)  # noqa: E731
    with running_server(model_dir, load=load) as server:
        for stream in (False, True):
            body = {"prompt": [[5, 6], list(range(5, 105))], "max_tokens": 4, "stream": stream}
            response = httpx.post(f"{server.url}{COMPLETIONS}", json=body)
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert error["param"] == "prompt[1]" and "at most 64 tokens" in error["message"], error
        body = {"prompt": [[5, 6], list(range(5, 69))], "max_tokens": 4}
        assert httpx.post(f"{server.url}{COMPLETIONS}", json=body).status_code == 200


@pytest.fixture(scope="module")
def fuzz_server(model_dir: Path) -> Iterator[ServerThread]:
    # A short context and few sequences bound the work any generated request can ask for.
    with running_server(model_dir, load=lambda: make_llm(model_dir, max_model_len=64, max_num_seqs=4)) as server:
        yield server


FUZZ_EXAMPLES = 30


def test_schemathesis_finds_no_server_error(fuzz_server: ServerThread) -> None:
    import hypothesis
    import schemathesis
    from schemathesis.generation.modes import GenerationMode

    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
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
                response = case.call(base_url=fuzz_server.url, timeout=30)
                if response.status_code >= 500:
                    server_errors.append(f"{case.method} {case.path} {case.body!r} -> {response.status_code}")

            try:
                check()
            except hypothesis.errors.Unsatisfiable:
                # An operation without inputs (GET /ping) has no invalid request to make.
                assert mode is GenerationMode.NEGATIVE and operation.method.upper() == "GET"
    assert not server_errors, server_errors[:5]

"""Structured outputs offline and on every route: the text is what the schema, regex, choice or grammar allows."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from neuron_llm.llm import LLM
from neuron_llm.sampling_params import SamplingParams, StructuredOutputsParams
from neuron_llm.serve.protocol import ResponseFormat, StructuredOutputs
from tests.conftest import BOUNDED_JSON_SCHEMA, fits_bounded_schema
from tests.serve.conftest import ServerThread, make_llm

pytest.importorskip("llguidance")

USER = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def llm(model_dir: Path) -> LLM:
    return make_llm(model_dir)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_each_completion_is_what_its_structure_allows(llm: LLM, temperature: float) -> None:
    def texts(structure: StructuredOutputsParams) -> list[str]:
        params = SamplingParams(temperature=temperature, max_tokens=40, n=3, seed=3, structured_outputs=structure)
        outputs = llm.generate("Hello", params)[0].outputs
        assert all(output.finish_reason == "stop" for output in outputs), outputs
        return [output.text for output in outputs]

    assert all(re.fullmatch(r"[0-9]{3}", text) for text in texts(StructuredOutputsParams(regex="[0-9]{3}")))
    choices = ["the fox", "hello world"]
    assert set(texts(StructuredOutputsParams(choice=choices))) <= set(choices)
    assert all(
        fits_bounded_schema(json.loads(text)) for text in texts(StructuredOutputsParams(json=BOUNDED_JSON_SCHEMA))
    )
    assert all(
        re.fullmatch(r"say [a-z]{2}", text)
        for text in texts(StructuredOutputsParams(grammar='start: "say " /[a-z]{2}/'))
    )


@pytest.mark.parametrize(
    "engine_options", [{"async_scheduling": True}, {"speculative_config": {"num_speculative_tokens": 3}}]
)
def test_async_scheduling_and_speculation_change_no_structured_token(
    llm: LLM, model_dir: Path, engine_options: dict[str, Any]
) -> None:
    # Each grammar step reads the token before it: no step overlaps, and no proposal is made.
    params = [
        SamplingParams(
            temperature=t, max_tokens=24, seed=7, structured_outputs=StructuredOutputsParams(json=BOUNDED_JSON_SCHEMA)
        )
        for t in (0.0, 1.0)
    ]
    expected = [output.outputs[0].token_ids for output in llm.generate(["Hello", "Hi there"] * 2, params * 2)]
    other = make_llm(model_dir, **engine_options)
    assert [output.outputs[0].token_ids for output in other.generate(["Hello", "Hi there"] * 2, params * 2)] == expected


def test_the_token_that_completes_the_structure_ends_the_sequence_even_before_min_tokens(llm: LLM) -> None:
    choice = StructuredOutputsParams(choice=["yes", "no"])
    for min_tokens in (0, 8):
        params = SamplingParams(temperature=0.0, max_tokens=16, min_tokens=min_tokens, structured_outputs=choice)
        output = llm.generate("Hello", params)[0].outputs[0]
        # No EOS after it, and none drawn from a row min_tokens left empty.
        assert (output.text, output.finish_reason) in {("yes", "stop"), ("no", "stop")}
        assert llm.get_tokenizer().decode(output.token_ids) == output.text


def test_an_invalid_structure_is_refused_alone(llm: LLM) -> None:
    running = llm.engine.add_request("Hello", SamplingParams(temperature=0.0, max_tokens=4))
    with pytest.raises(ValueError, match=r"^structured_outputs\.regex: .*unclosed character class"):
        llm.engine.add_request("Hello", SamplingParams(structured_outputs=StructuredOutputsParams(regex="[0-9")))
    finished = []
    while llm.engine.has_unfinished_requests():
        finished += [output.request_id for output in llm.engine.step() if output.finished]
    assert finished == [running]


def _post(server: ServerThread, route: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.url}{route}", json={"max_tokens": 40, **body}, timeout=60)


def test_routes_hold_the_text_to_the_requested_structure(server: ServerThread) -> None:
    json_schema = {
        "type": "json_schema",
        "json_schema": {"name": "flag", "schema": BOUNDED_JSON_SCHEMA, "strict": True},
    }
    for temperature in (0.0, 1.0):
        chat = {"messages": USER, "temperature": temperature, "seed": 1}
        reply = _post(server, "/v1/chat/completions", {**chat, "response_format": json_schema}).json()
        assert fits_bounded_schema(json.loads(reply["choices"][0]["message"]["content"]))
        # Any object, or any JSON (a schema left out or empty): a random model may not close it in time.
        for response_format in ({"type": "json_object"}, {**json_schema, "json_schema": {"name": "any"}}):
            reply = _post(server, "/v1/chat/completions", {**chat, "response_format": response_format})
            assert reply.status_code == 200, reply.text
        completion = {"prompt": "Hello", "temperature": temperature, "n": 2, "seed": 1}
        choices = _post(server, "/v1/completions", {**completion, "structured_outputs": {"regex": "[a-c]{4}"}})
        assert all(re.fullmatch("[a-c]{4}", choice["text"]) for choice in choices.json()["choices"])
        picked = _post(server, "/v1/completions", {**completion, "structured_outputs": {"choice": ["up", "down"]}})
        assert {choice["text"] for choice in picked.json()["choices"]} <= {"up", "down"}
    tgi = {
        "inputs": "Hello",
        "parameters": {"max_new_tokens": 40, "grammar": {"type": "json", "value": BOUNDED_JSON_SCHEMA}},
    }
    generated = httpx.post(f"{server.url}/invocations", json=tgi, timeout=60).json()[0]["generated_text"]
    assert fits_bounded_schema(json.loads(generated))
    tgi["parameters"]["grammar"] = {"type": "regex", "value": "[0-9]{2}"}
    assert re.fullmatch(
        "[0-9]{2}", httpx.post(f"{server.url}/invocations", json=tgi, timeout=60).json()[0]["generated_text"]
    )


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("/v1/completions", {"prompt": "a", "structured_outputs": {"regex": "[0-9"}}, "structured_outputs"),
        (
            "/v1/completions",
            {"prompt": "a", "structured_outputs": {"regex": "a", "choice": ["b"]}},
            "structured_outputs",
        ),
        ("/v1/completions", {"prompt": "a", "structured_outputs": {"json": "[1"}}, "structured_outputs"),
        ("/v1/completions", {"prompt": "a", "structured_outputs": {"json": "[" * 5000}}, "structured_outputs"),
        # Valid, but no text matches it.
        ("/v1/completions", {"prompt": "a", "structured_outputs": {"regex": "[^\\s\\S]"}}, "structured_outputs"),
        # Valid Lark, but a token the vocabulary lacks: found when compiled with the tokenizer.
        (
            "/v1/completions",
            {"prompt": "a", "structured_outputs": {"grammar": "start: <[999999]>"}},
            "structured_outputs",
        ),
        ("/v1/chat/completions", {"messages": USER, "response_format": {"type": "json_schema"}}, "response_format"),
        (
            "/v1/chat/completions",
            {
                "messages": USER,
                "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}},
            },
            "response_format",
        ),
        (
            "/v1/chat/completions",
            {"messages": USER, "response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
            "structured_outputs",
        ),
        (
            "/invocations",
            {"inputs": "a", "parameters": {"grammar": {"type": "regex", "value": "("}}},
            "parameters.grammar",
        ),
        (
            "/invocations",
            {"inputs": "a", "parameters": {"grammar": {"type": "regex", "value": {}}}},
            "parameters.grammar",
        ),
    ],
)
def test_a_bad_structure_is_a_400_naming_its_field(server: ServerThread, route: str, body: dict, param: str) -> None:
    response = httpx.post(f"{server.url}{route}", json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param, response.json()


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("/v1/completions", {"prompt": "a", "structured_outputs": {"regex": "a{1000000}"}}, "structured_outputs"),
        (
            "/v1/completions",
            {"prompt": "a", "structured_outputs": {"regex": "a{1000000}"}, "stream": True},
            "structured_outputs",
        ),
        (
            "/v1/chat/completions",
            {"messages": USER, "structured_outputs": {"regex": "a{1000000}"}},
            "structured_outputs",
        ),
        (
            "/invocations",
            {"inputs": "a", "parameters": {"grammar": {"type": "regex", "value": "a{1000000}"}}},
            "parameters.grammar",
        ),
    ],
)
def test_a_grammar_that_fails_partway_fails_its_request_alone(
    server: ServerThread, route: str, body: dict, param: str
) -> None:
    # Past llguidance's lexer limits: it compiles, then fails as tokens come.
    limits = (
        {"parameters": {**body["parameters"], "max_new_tokens": 40}} if "parameters" in body else {"max_tokens": 40}
    )
    response = httpx.post(f"{server.url}{route}", json={**body, **limits}, timeout=60)
    if response.headers["content-type"].startswith("text/event-stream"):  # failed after the first token
        error = json.loads(response.text.split("data: ")[-2])["error"]
    else:
        assert response.status_code == 400, response.text
        error = response.json()["error"]
    assert error["type"] == "invalid_request_error", error
    assert error["param"] == param and error["message"].startswith(f"{param}: "), error
    plain = httpx.post(f"{server.url}/v1/completions", json={"prompt": "a", "max_tokens": 4}, timeout=60)
    assert plain.status_code == 200 and plain.json()["choices"][0]["text"]


@pytest.mark.parametrize("constraint", [{}, {"min_tokens": 30}, {"allowed_token_ids": "a"}])
def test_a_grammar_given_up_on_is_named_whatever_else_forbids_its_eos(llm: LLM, constraint: dict) -> None:
    # Given up on, the grammar's mask allows EOS alone, which min_tokens holds back and "a" is not.
    if constraint.get("allowed_token_ids"):
        constraint = {"allowed_token_ids": llm.get_tokenizer().encode("a", add_special_tokens=False)}
    params = SamplingParams(max_tokens=40, structured_outputs=StructuredOutputsParams(regex="a{1000000}"), **constraint)
    with pytest.raises(ValueError, match=r"^prompt 0: structured_outputs\.regex: failed partway: "):
        llm.generate("a", params)


def test_a_grammar_refusing_every_allowed_token_fails_its_own_call(llm: LLM) -> None:
    # Every token the choice allows is banned: that request fails before its token is judged.
    # generate names the prompt; of two open streams, only that request's raises.
    x = llm.get_tokenizer().convert_tokens_to_ids("x")
    broken = SamplingParams(
        temperature=0.0, max_tokens=8, allowed_token_ids=[x], structured_outputs=StructuredOutputsParams(choice=["yes"])
    )
    plain = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    refused = r"structured_outputs\.choice: allows only tokens that allowed_token_ids forbid at output token 1$"
    with pytest.raises(ValueError, match=rf"^prompt 1: {refused}"):
        llm.generate(["Hello", "Hi"], [plain, broken])
    expected = llm.generate("Hello", plain)[0].outputs[0].token_ids
    healthy, failing = llm.stream("Hello", plain), llm.stream("Hi", broken)
    first = next(healthy)
    with pytest.raises(ValueError, match=rf"^the request: {refused}"):
        next(failing)
    last = first
    for last in healthy:
        pass
    assert last.finished and last.outputs[0].token_ids == expected
    assert not llm.engine.has_unfinished_requests()


def test_strict_mode_closes_the_schema_s_objects() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    for strict in (None, False, True):
        response_format = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": strict}}
        params = ResponseFormat.model_validate(response_format).structured_outputs()
        assert params.disable_additional_properties is bool(strict)
    body = {"json": schema, "disable_additional_properties": True}
    assert StructuredOutputs.model_validate(body).params().disable_additional_properties

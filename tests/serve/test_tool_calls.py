"""Tool calls in chat completions: tools reach the template, and replies become calls, whole or streamed."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from neuron_llm.loader import render_chat
from neuron_llm.serve import ServeSettings
from neuron_llm.serve.protocol import ChatCompletionRequest, ChatTool
from neuron_llm.serve.tools import ToolCalling, parse_llama3_json
from tests.conftest import BOUNDED_JSON_SCHEMA, fits_bounded_schema
from tests.serve.conftest import ServerThread, make_llm, make_slow_llm, running_server

pytest.importorskip("llguidance")

# Tools as Llama 3.1's template writes them: the functions in the system turn, a call as JSON.
TOOLS_TEMPLATE = (
    "{% if tools %}<|system|>{% for t in tools %}{{ t.function.name }}: {{ t.function.parameters | tojson }};"
    "{% endfor %}<|end|>{% endif %}"
    "{% for m in messages %}<|{{ m.role }}|>{% if m.tool_calls %}{% for c in m.tool_calls %}"
    '{"name": "{{ c.function.name }}", "parameters": {{ c.function.arguments | tojson }}}'
    "{% endfor %}{% else %}{{ m.content }}{% endif %}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
UNIT = {
    "type": "object",
    "properties": {"unit": {"enum": ["c", "f"]}},
    "required": ["unit"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": BOUNDED_JSON_SCHEMA}},
    {"type": "function", "function": {"name": "get_time", "description": "Now.", "parameters": UNIT}},
]
USER = [{"role": "user", "content": "What is the weather?"}]
GREEDY = {"temperature": 0.0, "max_tokens": 120}
LLAMA3_CALL = {
    "type": "object",
    "properties": {"name": {"enum": ["get_time"]}, "parameters": UNIT},
    "required": ["name", "parameters"],
    "additionalProperties": False,
    "x-guidance": {"whitespace_flexible": False},
}
"""A reply the llama3_json parser reads as a call: what a Llama 3 model writes, held here by a
structured output since the test model is random."""


@pytest.fixture(scope="module")
def tools_model_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tools-llama")
    shutil.copytree(model_dir, path, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = TOOLS_TEMPLATE
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tools_server(tools_model_dir: Path) -> Iterator[ServerThread]:
    with running_server(
        tools_model_dir, load=lambda: make_llm(tools_model_dir, max_model_len=512), tool_call_parser="llama3_json"
    ) as server:
        yield server


@pytest.fixture(scope="module")
def client(tools_server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{tools_server.url}/v1", api_key="unused", max_retries=0, timeout=30)


def chat(client: openai.OpenAI, **options: Any) -> tuple[Any, list[Any]]:
    """The reply whole, and the chunks of the same request streamed."""
    options = {"model": client.models.list().data[0].id, "messages": USER, **GREEDY, **options}
    return client.chat.completions.create(**options), list(client.chat.completions.create(stream=True, **options))


def streamed_calls(chunks: list[Any]) -> list[tuple[str, str]]:
    return [
        (c.function.name, c.function.arguments) for ch in chunks for d in ch.choices for c in d.delta.tool_calls or ()
    ]


def test_tools_and_past_calls_reach_the_chat_template(tools_model_dir: Path) -> None:
    body = ChatCompletionRequest.model_validate(
        {
            "messages": [
                *USER,
                {"role": "assistant", "content": None, "tool_calls": [_call("get_time", '{"unit": "c"}')]},
                {"role": "tool", "content": "12:00", "tool_call_id": "call_1"},
            ],
            "tools": TOOLS,
        }
    )
    tokenizer = AutoTokenizer.from_pretrained(tools_model_dir)
    text = render_chat(tokenizer, [m.for_template() for m in body.messages], **body.template_options())
    assert text == (
        f"<|system|>get_weather: {json.dumps(BOUNDED_JSON_SCHEMA)};get_time: {json.dumps(UNIT)};<|end|>"
        "<|user|>What is the weather?<|end|>"
        '<|assistant|>{"name": "get_time", "parameters": {"unit": "c"}}<|end|>'
        "<|tool|>12:00<|end|><|assistant|>"
    )
    # Empty arguments are a call without any, as vLLM reads them.
    call = {"role": "assistant", "content": None, "tool_calls": [_call("now", "")]}
    body = ChatCompletionRequest.model_validate({"messages": [*USER, call]})
    assert body.messages[1].for_template()["tool_calls"][0]["function"]["arguments"] == {}


def test_tools_reach_the_template_as_the_client_wrote_them(tools_server: ServerThread, tools_model_dir: Path) -> None:
    # Key order, a null description and a schema without "type" render as transformers
    # renders the same dicts (and LLM.chat does), not as validated.
    tools = [
        {"type": "function", "function": {"name": "get_time", "description": None, "parameters": {"properties": {}}}},
        {"function": {"parameters": {"properties": {"unit": {"enum": ["c"]}}, "type": "object"}, "name": "unit"}},
    ]
    tools[1]["type"] = "function"
    tokenizer = AutoTokenizer.from_pretrained(tools_model_dir)
    text = tokenizer.apply_chat_template(USER, tools=tools, add_generation_prompt=True, tokenize=False)
    served = httpx.post(f"{tools_server.url}/tokenize", json={"messages": USER, "tools": tools})
    assert served.status_code == 200, served.text
    assert served.json()["tokens"] == tokenizer.encode(text, add_special_tokens=False)
    # A function of no parameters (left out or null) takes an empty object's schema, which
    # this template reads, here as in LLM.chat.
    for now in ({"name": "now"}, {"name": "now", "parameters": None}):
        rendered = render_chat(tokenizer, USER, tools=[{"type": "function", "function": now}])
        assert rendered.startswith('<|system|>now: {"type": "object", "properties": {}};<|end|>')


def test_a_named_function_is_called_with_arguments_its_schema_allows(client: openai.OpenAI) -> None:
    choice = {"type": "function", "function": {"name": "get_weather"}}
    whole, chunks = chat(client, tools=TOOLS, tool_choice=choice)
    (reply,) = whole.choices
    (call,) = reply.message.tool_calls
    assert reply.message.content is None and reply.finish_reason == "stop"
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert fits_bounded_schema(json.loads(call.function.arguments))
    # Streamed: the role, then the call whole in one chunk, which ends the choice.
    assert streamed_calls(chunks) == [("get_weather", call.function.arguments)]
    assert [c.choices[0].finish_reason for c in chunks] == [None, "stop"]
    assert all(not c.choices[0].delta.content for c in chunks)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_required_tools_give_calls_of_the_requests_functions(client: openai.OpenAI, seed: int) -> None:
    options = {"temperature": 1.0, "seed": seed, "parallel_tool_calls": False}
    whole, chunks = chat(client, tools=TOOLS, tool_choice="required", **options)
    (reply,) = whole.choices
    (call,) = reply.message.tool_calls
    assert reply.finish_reason == "tool_calls" and reply.message.content is None
    arguments = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        assert fits_bounded_schema(arguments)
    else:
        assert call.function.name == "get_time" and arguments["unit"] in ("c", "f")
    assert streamed_calls(chunks) == [(call.function.name, call.function.arguments)]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_required_calls_cut_short_by_max_tokens_are_the_replys_text(client: openai.OpenAI) -> None:
    whole, chunks = chat(client, tools=TOOLS, tool_choice="required", max_tokens=3)
    (reply,) = whole.choices
    assert reply.finish_reason == "length" and reply.message.tool_calls == []
    assert reply.message.content.startswith("[")
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply.message.content


def test_auto_reads_llama3_json_calls_from_the_reply(client: openai.OpenAI) -> None:
    calls = {"structured_outputs": {"json": LLAMA3_CALL}}
    whole, chunks = chat(client, tools=TOOLS, extra_body=calls)
    (reply,) = whole.choices
    (call,) = reply.message.tool_calls
    assert reply.finish_reason == "tool_calls" and reply.message.content is None
    assert call.function.name == "get_time" and json.loads(call.function.arguments)["unit"] in ("c", "f")
    # Held back until the reply ended, then sent as the call.
    assert streamed_calls(chunks) == [("get_time", call.function.arguments)]
    assert all(not c.choices[0].delta.content for c in chunks)


@pytest.mark.parametrize(
    "pattern", ["[a-z]{6}", " {2}[a-z]{4}", "[{][a-z]{4}", r'\{"name":"get_date","parameters":\{\}\}']
)
def test_auto_streams_a_reply_that_is_no_call_as_content(client: openai.OpenAI, pattern: str) -> None:
    # Text from the start; whitespace, then text; a brace that turns out to start no JSON; a
    # call of a function the request did not offer.
    whole, chunks = chat(client, tools=TOOLS, tool_choice="auto", extra_body={"structured_outputs": {"regex": pattern}})
    (reply,) = whole.choices
    assert reply.message.tool_calls == [] and reply.finish_reason == "stop"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply.message.content
    assert not streamed_calls(chunks)


def test_auto_streams_text_as_it_comes(tools_model_dir: Path) -> None:
    # Steps slow enough that the server sends each token before the next is made; at full speed
    # a busy machine may merge tokens into one chunk, which is allowed.
    load = lambda: make_slow_llm(tools_model_dir, step_s=0.1, max_model_len=512)  # noqa: E731
    with running_server(tools_model_dir, load=load, tool_call_parser="llama3_json") as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30)
        whole, chunks = chat(
            client, tools=TOOLS, tool_choice="auto", extra_body={"structured_outputs": {"regex": "[a-z]{6}"}}
        )
    content = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert "".join(content) == whole.choices[0].message.content
    assert len(content) > 1  # not held back until the reply ended


def test_tool_choice_none_renders_the_tools_and_calls_nothing(client: openai.OpenAI) -> None:
    calls = {"structured_outputs": {"json": LLAMA3_CALL}}
    whole, _ = chat(client, tools=TOOLS, tool_choice="none", extra_body=calls)
    (reply,) = whole.choices
    assert reply.message.tool_calls == [] and json.loads(reply.message.content)["name"] == "get_time"
    assert whole.usage.prompt_tokens > chat(client, extra_body=calls)[0].usage.prompt_tokens


def test_held_calls_take_schema_references_functions_of_no_parameters_and_schemas_of_any_object(
    client: openai.OpenAI,
) -> None:
    # References of every form a schema generator writes, each resolved in its own function's
    # schema: two functions define "Unit" differently, one in draft 7's "definitions".
    unit = {"$defs": {"Unit": {"enum": ["c", "f"]}}, **UNIT, "properties": {"unit": {"$ref": "#/$defs/Unit"}}}
    kelvin = {
        **UNIT,
        "definitions": {"Unit": {"enum": ["k"]}},
        "properties": {"unit": {"$ref": "#/definitions/Unit"}, "again": {"$ref": "#/properties/unit"}},
        "required": ["unit", "again"],
    }
    tools = [
        {"type": "function", "function": {"name": "get_time", "parameters": unit}},
        {"type": "function", "function": {"name": "get_kelvin", "parameters": kelvin}},
        {"type": "function", "function": {"name": "now"}},  # no parameters: none taken
        {"type": "function", "function": {"name": "anything", "parameters": {}}},
    ]

    def check(arguments: Any, name: str) -> None:
        assert isinstance(arguments, dict)
        if name == "get_time":
            assert arguments["unit"] in ("c", "f")
        if name == "get_kelvin":
            assert arguments == {"unit": "k", "again": "k"}
        if name == "now":
            assert arguments == {}

    # Each function alone, then the four together: one schema in which each function's
    # references still resolve to its own definitions.
    for seed, offered in enumerate([[tool] for tool in tools] + [tools] * 4):
        # The schemas fill most of the context in the prompt.
        options = {"temperature": 1.0, "seed": seed, "parallel_tool_calls": False, "max_tokens": 60}
        whole, _ = chat(client, tools=offered, tool_choice="required", **options)
        if whole.choices[0].finish_reason == "length":
            assert "anything" in [tool["function"]["name"] for tool in offered]  # any object may run long
            continue
        (call,) = whole.choices[0].message.tool_calls
        check(json.loads(call.function.arguments), call.function.name)
    # The template reads every function's parameters; those left out are an empty object, and
    # the call's arguments are held to none (OpenAI: "an empty parameter list").
    now = {"type": "function", "function": {"name": "now"}}
    named = {"type": "function", "function": {"name": "now"}}
    body = ChatCompletionRequest.model_validate({"messages": USER, "tools": [now], "tool_choice": named})
    assert body.tools is not None and body.tools[0].function.parameters == {"type": "object", "properties": {}}
    held = ToolCalling.of(body).structure().json  # type: ignore[union-attr]
    assert held == {**held, "type": "object", "properties": {}, "additionalProperties": False}
    whole, _ = chat(client, tools=[now], tool_choice=named)
    (call,) = whole.choices[0].message.tool_calls
    assert json.loads(call.function.arguments) == {}
    # The reply goes back into the history as it came, with a stream's index kept by the client.
    history = [*USER, {"role": "assistant", "tool_calls": [{**call.model_dump(), "index": 0}]}]
    assert client.chat.completions.create(model=whole.model, messages=history, max_tokens=2).choices


def test_auto_with_parallel_tool_calls_off_keeps_the_first_call(client: openai.OpenAI) -> None:
    two = r'\{"name":"get_time","parameters":\{"unit":"c"\}\};\{"name":"get_time","parameters":\{"unit":"f"\}\}'
    options = {"tools": TOOLS, "extra_body": {"structured_outputs": {"regex": two}}}
    both, _ = chat(client, **options)
    assert [json.loads(c.function.arguments)["unit"] for c in both.choices[0].message.tool_calls] == ["c", "f"]
    first, chunks = chat(client, parallel_tool_calls=False, **options)
    assert [json.loads(c.function.arguments)["unit"] for c in first.choices[0].message.tool_calls] == ["c"]
    assert streamed_calls(chunks) == [("get_time", '{"unit": "c"}')]


def test_auto_needs_a_tool_call_parser_and_held_calls_exclude_other_structures(model_dir: Path) -> None:
    with running_server(model_dir, load=lambda: make_llm(model_dir)) as server:
        body = {"messages": USER, "tools": TOOLS}
        refused = httpx.post(f"{server.url}/v1/chat/completions", json=body).json()["error"]
        assert refused["param"] == "tool_choice" and "--tool-call-parser (llama3_json)" in refused["message"]
        held = {**body, "tool_choice": "required", "response_format": {"type": "json_object"}, "max_tokens": 4}
        refused = httpx.post(f"{server.url}/v1/chat/completions", json=held).json()["error"]
        assert (
            refused["param"] == "tool_choice"
            and "excludes structured_outputs and response_format" in refused["message"]
        )
        # Without auto, no parser is needed; nor with no tools.
        named = {**body, "tool_choice": {"type": "function", "function": {"name": "get_time"}}, "max_tokens": 12}
        assert httpx.post(f"{server.url}/v1/chat/completions", json=named).status_code == 200
        no_tools = {"messages": USER, "tools": [], "tool_choice": "auto", "max_tokens": 2}
        assert httpx.post(f"{server.url}/v1/chat/completions", json=no_tools).status_code == 200
        # Arguments nested past what JSON parsing takes are refused by name, not a server error.
        deep = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[" * 50_000 + "]" * 50_000}}
        history = {"messages": [*USER, {"role": "assistant", "tool_calls": [deep]}]}
        refused = httpx.post(f"{server.url}/v1/chat/completions", json=history).json()["error"]
        assert refused["param"] == "messages[1].tool_calls" and "nests too deep" in refused["message"]
        string_schema = {"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}
        refused = httpx.post(f"{server.url}/v1/chat/completions", json={**body, "tools": [string_schema]}).json()
        assert refused["error"]["param"] == "tools[0].function.parameters"
    with pytest.raises(ValueError, match="tool_call_parser='hermes': must be one of llama3_json"):
        ServeSettings(tool_call_parser="hermes")


def test_llama3_json_calls_are_parsed_whole_or_not_at_all() -> None:
    assert parse_llama3_json('{"name": "f", "parameters": {"a": 1}}') == [("f", '{"a": 1}')]
    assert parse_llama3_json(
        ' <|python_tag|>{"name": "f", "arguments": {}} ; {"name": "g", "parameters": {"b": [2]}}\n'
    ) == [
        ("f", "{}"),
        ("g", '{"b": [2]}'),
    ]
    assert parse_llama3_json('{"name": "f", "parameters": {"city": "Zürich"}};') == [("f", '{"city": "Zürich"}')]
    for text in (
        "Sure: {}",
        '{"name": "f"}',  # no arguments
        '{"name": 3, "parameters": {}}',
        '{"name": "f", "parameters": "x"}',
        '{"name": "f", "parameters": {}} and more',
        '{"name": "f", "parameters": {',
        "[]",
        # Python's JSON parser refuses integers past 4,300 digits with a ValueError of its own.
        '{"name": "f", "parameters": {"n": ' + "7" * 5000 + "}}",
    ):
        assert parse_llama3_json(text) is None, text
    # "auto": calls of functions the request did not offer are content; with parallel calls off,
    # only the first call counts.
    offered = [ChatTool.model_validate(tool) for tool in TOOLS]
    reply = '{"name": "get_time", "parameters": {"unit": "c"}}; {"name": "other", "parameters": {}}'
    assert ToolCalling("auto", offered, None, True).calls(reply) is None
    (first,) = ToolCalling("auto", offered, None, False).calls(reply) or []
    assert first.function.name == "get_time"
    required = ToolCalling("required", [], None, True)
    assert required.calls('[{"name": "f", "parameters": {"n": ' + "7" * 5000) is None


def _call(name: str, arguments: str) -> dict[str, Any]:
    return {"id": "call_1", "type": "function", "function": {"name": name, "arguments": arguments}}

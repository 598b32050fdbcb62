"""vLLM's /tokenize, /detokenize and /version, and the chat template options /tokenize shares with chat completions."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

import neuron_llm
from neuron_llm.loader import render_chat
from tests.serve.conftest import ServerThread, metric

_JSON = {"Content-Type": "application/json"}
SUCCESS = 'neuron_llm_requests_total{outcome="success"}'
CONVERSATION = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Once upon"}]


def _post(server: ServerThread, route: str, body: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(f"{server.url}{route}", json=body, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def test_tokenize_gives_a_texts_tokens_and_detokenize_its_text(server: ServerThread) -> None:
    succeeded = metric(server, SUCCESS)
    model = server.app.state.server.ready_model()
    tokenizer = model.tokenizer
    text = "Hello world, how are you?"
    got = _post(server, "/tokenize", {"prompt": text, "return_token_strs": True})
    assert got["tokens"] == tokenizer.encode(text) and got["count"] == len(got["tokens"])
    assert got["max_model_len"] == model.max_model_len
    assert got["token_strs"] == tokenizer.convert_ids_to_tokens(got["tokens"])
    bare = _post(server, "/tokenize", {"prompt": text, "add_special_tokens": False, "model": server.model_name})
    assert bare["tokens"] == tokenizer.encode(text, add_special_tokens=False) and bare["token_strs"] is None
    assert _post(server, "/detokenize", {"tokens": bare["tokens"]}) == {"prompt": text}
    special = tokenizer.convert_tokens_to_ids("<|user|>")
    assert _post(server, "/detokenize", {"tokens": [special]})["prompt"] == "<|user|>"
    # Counted as served, as their refusals are counted as invalid.
    assert metric(server, SUCCESS) == succeeded + 4


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"add_generation_prompt": False},
        {"add_generation_prompt": False, "continue_final_message": True},
        {"chat_template_kwargs": {"add_generation_prompt": False}},  # vLLM's: the kwargs win
    ],
)
def test_a_conversation_tokenizes_as_a_chat_completion_renders_it(
    server: ServerThread, options: dict[str, Any]
) -> None:
    tokenizer = server.app.state.server.ready_model().tokenizer
    template_options = {k: v for k, v in options.items() if k != "chat_template_kwargs"}
    text = render_chat(tokenizer, CONVERSATION, **{**template_options, **options.get("chat_template_kwargs", {})})
    got = _post(server, "/tokenize", {"messages": CONVERSATION, **options})
    assert got["tokens"] == tokenizer.encode(text, add_special_tokens=False)
    assert text.endswith("Once upon") == bool(options.get("continue_final_message"))
    assert text.endswith("<|assistant|>") == (options == {})
    chat = _post(server, "/v1/chat/completions", {"messages": CONVERSATION, "max_tokens": 1, **options})
    assert chat["usage"]["prompt_tokens"] == got["count"]


@pytest.mark.parametrize(
    ("route", "body", "status", "param"),
    [
        ("/tokenize", {"prompt": "Hi", "messages": [{"role": "user", "content": "Hi"}]}, 400, "prompt"),
        ("/tokenize", {"text": "Hi"}, 400, "text"),
        ("/tokenize", {}, 400, "prompt"),
        ("/tokenize", {"prompt": "Hi", "model": "gpt-4"}, 404, "model"),
        ("/tokenize", {"prompt": "\ud83d"}, 400, "prompt"),
        ("/tokenize", {"messages": []}, 400, "messages"),
        ("/tokenize", {"messages": CONVERSATION, "continue_final_message": True}, 400, "continue_final_message"),
        (
            "/v1/chat/completions",
            {"messages": CONVERSATION, "continue_final_message": True},
            400,
            "continue_final_message",
        ),
        (
            "/v1/chat/completions",
            {"messages": CONVERSATION, "chat_template_kwargs": {"chat_template": "{{ 7 }}"}},
            400,
            "chat_template_kwargs",
        ),
        *(
            ("/tokenize", {"messages": CONVERSATION, "chat_template_kwargs": {name: True}}, 400, "chat_template_kwargs")
            for name in ("self", "tokenizer", "conversations", "sanitize_control_tokens", "tokenize")
        ),
        ("/detokenize", {"tokens": [-1]}, 400, "tokens[0]"),
        ("/detokenize", {"tokens": [10**9]}, 400, "tokens"),
        ("/detokenize", {"tokens": "Hi"}, 400, "tokens"),
    ],
)
def test_bad_bodies_are_a_4xx_naming_the_field(
    server: ServerThread, route: str, body: dict[str, Any], status: int, param: str
) -> None:
    # Sent as ASCII JSON: a lone surrogate is an escape there, which httpx's encoding refuses.
    response = httpx.post(f"{server.url}{route}", content=json.dumps(body), headers=_JSON, timeout=30)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param, response.json()


def test_version_is_the_packages(server: ServerThread) -> None:
    assert httpx.get(f"{server.url}/version").json() == {"version": neuron_llm.__version__}

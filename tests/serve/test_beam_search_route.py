"""``use_beam_search`` in completions and chat: the same beams as ``LLM.beam_search``, whole or
streamed; options a beam search cannot honour refused by name; a client that leaves aborts it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from neuron_llm import LLM, BeamSearchParams
from tests.serve.conftest import ServerThread, leave_once, make_llm, make_slow_llm, metric, running_server, wait_for

BEAMS = {"use_beam_search": True, "n": 3, "max_tokens": 6, "return_token_ids": True}


@pytest.fixture(scope="module")
def offline(model_dir: Path) -> LLM:
    return make_llm(model_dir)


def offline_beams(llm: LLM, prompt_ids: list[int], **options: Any) -> list[tuple[list[int], float, str]]:
    """Each beam's generated tokens, cumulative logprob and finish reason, best first."""
    params = BeamSearchParams(beam_width=options.pop("n"), max_tokens=options.pop("max_tokens"), **options)
    (output,) = llm.beam_search([{"prompt_token_ids": prompt_ids}], params)
    return [(beam.tokens[len(prompt_ids) :], beam.cum_logprob, beam.finish_reason) for beam in output.sequences]


def is_text_of(text: str, token_ids: list[int], tokenizer: Any) -> bool:
    """Whether ``text`` is the tokens' as a sampled reply's: decoded, less a last character that
    they leave incomplete (U+FFFD, one a byte)."""
    whole = tokenizer.decode(token_ids, skip_special_tokens=True)
    return whole.startswith(text) and set(whole[len(text) :]) <= {"\ufffd"}


def post(server: ServerThread, route: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.url}{route}", json={"model": server.model_name, **body}, timeout=60)


def streamed(server: ServerThread, route: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    chunks = []
    body = {"model": server.model_name, "stream": True, **body}
    with httpx.stream("POST", f"{server.url}{route}", json=body, timeout=60) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[len("data: ") :]))
    return chunks


@pytest.mark.parametrize("options", [{}, {"length_penalty": 0.0}, {"max_tokens": 40, "length_penalty": 2.0}])
def test_completion_beams_are_llm_beam_search_s(server: ServerThread, offline: LLM, options: dict) -> None:
    body = {**BEAMS, "prompt": ["Hello world", "The quick brown"], **options}
    response = post(server, "/v1/completions", body)
    assert response.status_code == 200, response.text
    reply = response.json()
    choices = reply["choices"]
    assert [c["index"] for c in choices] == list(range(6))
    tokenizer = offline.tokenizer
    num_generated = 0
    for prompt_index, text in enumerate(body["prompt"]):
        prompt_ids = choices[prompt_index * 3]["prompt_token_ids"]
        assert prompt_ids == tokenizer.encode(text)
        want = offline_beams(offline, prompt_ids, **{"n": 3, "max_tokens": 6, **options})
        got = choices[prompt_index * 3 : prompt_index * 3 + 3]
        assert [c["token_ids"] for c in got] == [tokens for tokens, _, _ in want]
        assert [c["finish_reason"] for c in got] == [reason for _, _, reason in want]
        for choice, (tokens, _, _) in zip(got, want, strict=True):
            assert is_text_of(choice["text"], tokens, tokenizer)
            num_generated += len(tokens)
    prompt_tokens = sum(len(tokenizer.encode(text)) for text in body["prompt"])
    usage = reply["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (prompt_tokens, num_generated)


def test_a_streamed_beam_search_sends_each_beam_whole(server: ServerThread) -> None:
    body = {**BEAMS, "prompt": "Hello world"}
    whole = post(server, "/v1/completions", body).json()
    chunks = streamed(server, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
    *beams, usage = chunks
    assert [c["choices"][0]["index"] for c in beams] == [0, 1, 2]
    for chunk, choice in zip(beams, whole["choices"], strict=True):
        (sent,) = chunk["choices"]
        assert sent["text"] == choice["text"] and sent["finish_reason"] == choice["finish_reason"]
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]


def test_chat_beams_are_llm_beam_search_s(server: ServerThread, offline: LLM) -> None:
    body = {**BEAMS, "messages": [{"role": "user", "content": "Hi there"}], "temperature": 0}
    response = post(server, "/v1/chat/completions", body)
    assert response.status_code == 200, response.text
    reply = response.json()
    want = offline_beams(offline, reply["prompt_token_ids"], n=3, max_tokens=6)
    assert [c["token_ids"] for c in reply["choices"]] == [tokens for tokens, _, _ in want]
    texts = [c["message"]["content"] for c in reply["choices"]]
    assert all(is_text_of(text, tokens, offline.tokenizer) for text, (tokens, _, _) in zip(texts, want, strict=True))
    chunks = streamed(server, "/v1/chat/completions", body)
    sent: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            sent[choice["index"]] = sent.get(choice["index"], "") + (choice["delta"].get("content") or "")
    assert [sent[i] for i in range(3)] == texts


def test_an_eos_ends_a_beam_and_stays_in_its_tokens_only_when_asked(server: ServerThread, offline: LLM) -> None:
    # The model is random: find one-token prompts after which some best beam ends on its EOS.
    options = {"n": 3, "max_tokens": 4, "length_penalty": 0.0}
    params = BeamSearchParams(beam_width=3, max_tokens=4, length_penalty=0.0)
    candidates = [[token_id] for token_id in range(1, 200)]
    outputs = offline.beam_search([{"prompt_token_ids": ids} for ids in candidates], params)
    ends = [any(beam.finish_reason == "stop" for beam in output.sequences) for output in outputs]
    prompts = [ids for ids, ended in zip(candidates, ends, strict=True) if ended]
    assert prompts, "no prompt whose beams end on the EOS"
    eos = offline.engine.eos_token_ids
    for keep in (False, True):
        body = {**BEAMS, **options, "prompt": prompts[:2], "include_stop_str_in_output": keep}
        choices = post(server, "/v1/completions", body).json()["choices"]
        for prompt_index, prompt_ids in enumerate(prompts[:2]):
            got = choices[prompt_index * 3 : prompt_index * 3 + 3]
            want = offline_beams(offline, prompt_ids, **options, include_stop_str_in_output=keep)
            assert [c["token_ids"] for c in got] == [tokens for tokens, _, _ in want]
            assert [c["finish_reason"] for c in got] == [reason for _, _, reason in want]
        stopped = [c for c in choices if c["finish_reason"] == "stop"]
        assert stopped and all((c["token_ids"][-1:] != [] and c["token_ids"][-1] in eos) == keep for c in stopped)
        assert all(c["stop_reason"] is None for c in stopped)


@pytest.mark.parametrize(
    ("route", "fields", "param"),
    [
        ("/v1/completions", {"temperature": 0.7}, "temperature"),
        ("/v1/completions", {"top_p": 0.5}, "top_p"),
        ("/v1/completions", {"top_k": 5}, "top_k"),
        ("/v1/completions", {"stop": ["x"]}, "stop"),
        ("/v1/completions", {"logprobs": 2}, "logprobs"),
        ("/v1/completions", {"repetition_penalty": 1.2}, "repetition_penalty"),
        ("/v1/completions", {"structured_outputs": {"regex": "[a-z]+"}}, "structured_outputs"),
        ("/v1/completions", {"n": 11}, "n"),
        ("/v1/completions", {"echo": True, "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"length_penalty": "long"}, "length_penalty"),
        ("/v1/chat/completions", {"logprobs": True}, "logprobs"),
        ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
        ("/v1/chat/completions", {"max_completion_tokens": 0}, "max_completion_tokens"),
        (
            "/v1/chat/completions",
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]},
            "tools",
        ),
    ],
)
def test_what_beam_search_cannot_honour_is_a_400_naming_it(
    server: ServerThread, route: str, fields: dict, param: str
) -> None:
    prompt = {"prompt": "Hello"} if route == "/v1/completions" else {"messages": [{"role": "user", "content": "Hi"}]}
    response = post(server, route, {**BEAMS, **prompt, **fields})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_a_length_penalty_without_beam_search_is_a_400(server: ServerThread) -> None:
    response = post(server, "/v1/completions", {"prompt": "Hello", "length_penalty": 2.0})
    assert response.status_code == 400 and response.json()["error"]["param"] == "length_penalty"


def test_options_left_at_their_defaults_are_accepted(server: ServerThread) -> None:
    body = {**BEAMS, "prompt": "Hello", "top_p": 1.0, "top_k": -1, "stop": [], "seed": 7}
    for temperature in (0, 1.0):
        response = post(server, "/v1/completions", {**body, "temperature": temperature})
        assert response.status_code == 200, response.text
        assert len(response.json()["choices"]) == 3
    chat = {**BEAMS, "messages": [{"role": "user", "content": "Hi"}], "tool_choice": "none", "logprobs": False}
    assert post(server, "/v1/chat/completions", chat).status_code == 200


@pytest.fixture(scope="module")
def slow_server(model_dir: Path) -> Iterator[ServerThread]:
    with running_server(model_dir, load=lambda: make_slow_llm(model_dir, step_s=0.05)) as server:
        yield server


def test_a_client_that_leaves_aborts_the_search(slow_server: ServerThread) -> None:
    server = slow_server
    aborted = 'neuron_llm_requests_total{outcome="aborted"}'
    before, tokens = metric(server, aborted), metric(server, "neuron_llm_generation_tokens_total")
    body = {**BEAMS, "prompt": "Hello", "max_tokens": 200, "ignore_eos": True}
    # Its steps' requests end within a step: tokens, not running requests, show it runs.
    running = lambda: metric(server, "neuron_llm_generation_tokens_total") > tokens  # noqa: E731
    leave_once(server, body, running, "the search never ran")
    wait_for(lambda: metric(server, aborted) == before + 1, "the search was not aborted")
    wait_for(lambda: metric(server, "neuron_llm_num_requests_running") == 0, "its beams still run")
    wait_for(lambda: metric(server, "neuron_llm_kv_cache_usage_ratio") == 0, "KV blocks were not freed")

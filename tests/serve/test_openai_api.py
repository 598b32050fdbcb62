"""The OpenAI routes end to end, through the official ``openai`` client against a real server."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from neuron_llm.loader import render_chat
from neuron_llm.outputs import CompletionOutput
from neuron_llm.sampling_params import SamplingParams
from neuron_llm.serve.protocol import ChatMessage
from neuron_llm.serve.settings import ServeSettings
from tests.serve.conftest import SPECIAL_TOKENS, ServerThread, make_llm, metric, running_server

GREEDY = {"temperature": 0.0, "max_tokens": 12}


def token_counts(usage: Any) -> tuple[int, int, int]:
    """A usage's token counts, without its cached tokens: a repeated prompt hits the prefix cache."""
    return usage.prompt_tokens, usage.completion_tokens, usage.total_tokens


@pytest.fixture(scope="module")
def client(server: ServerThread) -> openai.OpenAI:
    # No retries: a 429 or 503 must surface as it is.
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def model_name(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def test_models_lists_the_served_model(client: openai.OpenAI, model_dir: Path) -> None:
    models = client.models.list().data
    assert [model.id for model in models] == [model_dir.name]
    assert client.models.retrieve(model_dir.name) == models[0]
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("org/other-model")
    assert missing.value.body["code"] == "model_not_found"


def test_completion_has_text_usage_and_finish_reason(client: openai.OpenAI, model_name: str) -> None:
    completion = client.completions.create(model=model_name, prompt="Hello world", **GREEDY)
    (choice,) = completion.choices
    assert choice.finish_reason in ("stop", "length")
    assert completion.usage is not None and completion.usage.prompt_tokens > 0
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    again = client.completions.create(model=model_name, prompt="Hello world", **GREEDY)
    assert again.choices[0].text == choice.text


def test_streamed_completion_adds_up_to_the_whole_one(client: openai.OpenAI, model_name: str) -> None:
    whole = client.completions.create(model=model_name, prompt="The quick brown fox", **GREEDY)
    chunks = list(
        client.completions.create(
            model=model_name,
            prompt="The quick brown fox",
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    text = "".join(choice.text for chunk in chunks for choice in chunk.choices)
    assert text == whole.choices[0].text
    assert [c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason] == [
        whole.choices[0].finish_reason
    ]
    assert chunks[-1].choices == [] and token_counts(chunks[-1].usage) == token_counts(whole.usage)


def test_continuous_usage_counts_each_choices_tokens_so_far(client: openai.OpenAI, model_name: str) -> None:
    stream_options = {"include_usage": True, "continuous_usage_stats": True}
    options = {"model": model_name, "stream": True, "n": 2, "seed": 7, "temperature": 1.0, "max_tokens": 6}
    completion = list(
        client.completions.create(
            prompt=["Hello world", "The quick brown fox"], stream_options=stream_options, **options
        )
    )
    chat = list(
        client.chat.completions.create(
            messages=[{"role": "user", "content": "Hi"}], stream_options=stream_options, **options
        )
    )
    for chunks in (completion, chat):
        *choice_chunks, last = chunks
        assert last.choices == [] and all(chunk.usage is not None for chunk in chunks)
        seen: dict[int, int] = {}
        prompt_tokens: dict[int, int] = {}
        for chunk in choice_chunks:
            (choice,) = chunk.choices
            usage = chunk.usage
            assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
            assert usage.completion_tokens >= seen.get(choice.index, 0)
            assert prompt_tokens.setdefault(choice.index, usage.prompt_tokens) == usage.prompt_tokens
            seen[choice.index] = usage.completion_tokens
        # The last chunk of each choice counts all its tokens; the usage chunk adds them up.
        assert last.usage.completion_tokens == sum(seen.values())
        assert all(count > 0 for count in seen.values())
    # Each completion choice counts its own prompt: two prompts of different lengths.
    prompt_of = {c.choices[0].index: c.usage.prompt_tokens for c in completion[:-1]}
    assert prompt_of[0] == prompt_of[1] != prompt_of[2] == prompt_of[3]
    assert completion[-1].usage.prompt_tokens == prompt_of[0] + prompt_of[2]
    # Chat opens each choice with its role, before any token.
    assert [c.usage.completion_tokens for c in chat[:2]] == [0, 0]
    # Without include_usage, continuous_usage_stats adds nothing, as in vLLM.
    plain = client.completions.create(prompt="Hi", stream_options={"continuous_usage_stats": True}, **options)
    assert all(chunk.usage is None for chunk in plain)


def test_usage_counts_the_prompt_tokens_found_in_the_prefix_cache(client: openai.OpenAI, model_name: str) -> None:
    # A prompt no other test sends, so its first request finds nothing cached.
    text = "Cached tokens, counted: " + " ".join(["A paged KV cache holds keys and values in fixed-size blocks."] * 3)
    first = client.completions.create(model=model_name, prompt=text, **GREEDY)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    # Whole blocks of 4 tokens, short of the last prompt token, whose logits must be computed.
    expected = (first.usage.prompt_tokens - 1) // 4 * 4
    again = client.completions.create(model=model_name, prompt=text, **GREEDY)
    assert again.usage.prompt_tokens_details.cached_tokens == expected > 0
    stream_options = {"include_usage": True, "continuous_usage_stats": True}
    streamed = list(
        client.completions.create(
            model=model_name, prompt=[text, text + " More."], stream=True, stream_options=stream_options, **GREEDY
        )
    )
    # Each choice counts its own prompt's; the usage chunk, both prompts'.
    by_choice = {c.choices[0].index: c.usage.prompt_tokens_details.cached_tokens for c in streamed[:-1]}
    assert by_choice[0] == expected and by_choice[1] >= expected
    assert streamed[-1].usage.prompt_tokens_details.cached_tokens == by_choice[0] + by_choice[1]
    messages = [{"role": "user", "content": text}]
    chats = [client.chat.completions.create(model=model_name, messages=messages, **GREEDY) for _ in range(2)]
    assert chats[0].usage.prompt_tokens_details.cached_tokens < chats[1].usage.prompt_tokens_details.cached_tokens
    chunks = list(
        client.chat.completions.create(
            model=model_name, messages=messages, stream=True, stream_options=stream_options, **GREEDY
        )
    )
    # The role chunk too: it is sent once the request is scheduled.
    cached = {chunk.usage.prompt_tokens_details.cached_tokens for chunk in chunks}
    assert cached == {chats[1].usage.prompt_tokens_details.cached_tokens}


def test_return_token_ids_gives_the_prompts_and_the_replys_tokens(
    client: openai.OpenAI, model_name: str, model_dir: Path
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    extra = {"extra_body": {"return_token_ids": True}}
    options = {"model": model_name, "prompt": "The quick brown fox", **GREEDY, **extra}
    (whole,) = client.completions.create(**options).choices
    assert whole.prompt_token_ids == tokenizer.encode("The quick brown fox")
    assert tokenizer.decode(whole.token_ids) == whole.text and len(whole.token_ids) == 12
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **options)]
    assert [c.prompt_token_ids for c in chunks] == [whole.prompt_token_ids] + [None] * (len(chunks) - 1)
    assert [t for c in chunks for t in c.token_ids] == whole.token_ids
    # Echoed, the prompt's tokens stay apart from the reply's.
    (echoed,) = client.completions.create(echo=True, **options).choices
    assert echoed.token_ids == whole.token_ids and echoed.prompt_token_ids == whole.prompt_token_ids

    chat_options = {"model": model_name, "messages": [{"role": "user", "content": "Hi"}], **GREEDY, **extra}
    reply = client.chat.completions.create(**chat_options)
    assert reply.prompt_token_ids == tokenizer.encode("<|user|>Hi<|end|><|assistant|>")
    assert len(reply.choices[0].token_ids) == reply.usage.completion_tokens
    stream = list(client.chat.completions.create(stream=True, **chat_options))
    assert stream[0].prompt_token_ids == reply.prompt_token_ids and stream[1].prompt_token_ids is None
    assert [t for c in stream for t in c.choices[0].token_ids or ()] == reply.choices[0].token_ids
    # Each choice's role chunk carries the prompt's ids, as in vLLM.
    two = list(client.chat.completions.create(stream=True, n=2, **chat_options))
    assert [c.choices[0].index for c in two if c.prompt_token_ids == reply.prompt_token_ids] == [0, 1]
    plain = client.chat.completions.create(**{**chat_options, "extra_body": {}})
    assert getattr(plain, "prompt_token_ids", None) is None and getattr(plain.choices[0], "token_ids", None) is None


def test_prompt_logprobs_score_each_prompt_token_as_echo_does(
    client: openai.OpenAI, model_name: str, model_dir: Path
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt_ids = tokenizer.encode("The quick brown fox")
    options = {"model": model_name, "prompt": prompt_ids, "temperature": 0, "max_tokens": 2}
    (choice,) = client.completions.create(**options, extra_body={"prompt_logprobs": 2}).choices
    scored = choice.prompt_logprobs
    assert len(scored) == len(prompt_ids) and scored[0] is None
    for token_id, entry in zip(prompt_ids[1:], scored[1:], strict=True):
        assert str(token_id) in entry and 2 <= len(entry) <= 3
        assert sorted(e["rank"] for e in entry.values() if e["rank"] <= 2) == [1, 2]
    echoed = client.completions.create(**options, echo=True, logprobs=0).choices[0].logprobs.token_logprobs
    expected = [None] + [entry[str(t)]["logprob"] for t, entry in zip(prompt_ids[1:], scored[1:], strict=True)]
    assert echoed[: len(prompt_ids)] == pytest.approx(expected, abs=1e-6)
    reply = client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": "Hi"}], max_tokens=2, extra_body={"prompt_logprobs": 0}
    )
    assert len(reply.prompt_logprobs) == reply.usage.prompt_tokens
    assert all(len(entry) == 1 for entry in reply.prompt_logprobs[1:])
    with pytest.raises(openai.BadRequestError, match="prompt_logprobs are not sent in a stream"):
        client.completions.create(**options, stream=True, extra_body={"prompt_logprobs": 1})
    # 0 is let through in a stream, as vLLM does, and sends nothing.
    streamed = list(client.completions.create(**options, stream=True, extra_body={"prompt_logprobs": 0}))
    assert all(getattr(c.choices[0], "prompt_logprobs", None) is None for c in streamed)


def test_each_choice_carries_its_own_prompts_ids_and_logprobs(client: openai.OpenAI, model_name: str) -> None:
    prompts = ["The quick brown fox", "Hello"]
    options = {"model": model_name, "prompt": prompts, "temperature": 0, "max_tokens": 3, "n": 2}
    extra = {"prompt_logprobs": 1, "return_token_ids": True}
    choices = client.completions.create(**options, extra_body=extra).choices
    alone = [
        client.completions.create(**{**options, "prompt": p, "n": 1}, extra_body=extra).choices[0] for p in prompts
    ]
    # Choices come prompt by prompt, n of each.
    assert [c.prompt_token_ids for c in choices] == [alone[0].prompt_token_ids] * 2 + [alone[1].prompt_token_ids] * 2
    assert [c.prompt_logprobs for c in choices] == [alone[0].prompt_logprobs] * 2 + [alone[1].prompt_logprobs] * 2
    stream = client.completions.create(**options, stream=True, extra_body={"return_token_ids": True})
    streamed = [c.choices[0] for c in stream]
    # Each choice's first chunk, and only that one, carries its prompt's ids.
    firsts = {}
    for chunk in streamed:
        if chunk.prompt_token_ids is not None:
            assert chunk.index not in firsts
            firsts[chunk.index] = chunk.prompt_token_ids
    assert firsts == {i: choices[i].prompt_token_ids for i in range(4)}


def test_echo_and_prompt_logprobs_go_together(client: openai.OpenAI, model_name: str, model_dir: Path) -> None:
    # As in vLLM: prompt_logprobs sets the prompt's logprobs, echoed or not, and echo with
    # logprobs alone reports them as prompt_logprobs too.
    prompt_ids = AutoTokenizer.from_pretrained(model_dir).encode("The quick brown fox")
    options = {"model": model_name, "prompt": prompt_ids, "temperature": 0, "max_tokens": 2}
    scored = client.completions.create(**options, extra_body={"prompt_logprobs": 3}).choices[0].prompt_logprobs
    for extra in ({}, {"max_tokens": 0}):
        (choice,) = client.completions.create(
            **{**options, **extra}, echo=True, extra_body={"prompt_logprobs": 3}
        ).choices
        assert choice.prompt_logprobs == scored and choice.logprobs is None
    (choice,) = client.completions.create(**options, echo=True, logprobs=1, extra_body={"prompt_logprobs": 3}).choices
    assert choice.prompt_logprobs == scored
    echoed = choice.logprobs.top_logprobs[1 : len(prompt_ids)]
    # The chosen token and logprobs=1 more: no more of prompt_logprobs' 3 than asked.
    assert all(1 <= len(top) <= 2 for top in echoed) and any(len(top) == 2 for top in echoed)
    (choice,) = client.completions.create(**options, echo=True, logprobs=3).choices
    assert choice.prompt_logprobs == scored
    assert getattr(client.completions.create(**options, logprobs=3).choices[0], "prompt_logprobs", None) is None


def test_chat_and_its_stream_agree(client: openai.OpenAI, model_name: str) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, how are you?"}]
    whole = client.chat.completions.create(model=model_name, messages=messages, **GREEDY)
    assert whole.choices[0].message.role == "assistant"
    assert whole.usage is not None and whole.usage.completion_tokens >= 1
    stream = client.chat.completions.create(model=model_name, messages=messages, stream=True, **GREEDY)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_a_developer_message_is_a_system_message(client: openai.OpenAI, model_name: str) -> None:
    answers = {}
    for role in ("system", "developer"):
        messages = [{"role": role, "content": "Be brief."}, {"role": "user", "content": "Hi"}]
        answers[role] = client.chat.completions.create(model=model_name, messages=messages, **GREEDY)
    # Rendered as the same template turn: the same prompt, so the same greedy answer.
    assert token_counts(answers["developer"].usage) == token_counts(answers["system"].usage)
    assert answers["developer"].choices[0].message.content == answers["system"].choices[0].message.content


def test_content_parts_are_joined_one_per_line(client: openai.OpenAI, model_name: str) -> None:
    parts = [{"type": "text", "text": "Hello,"}, {"type": "text", "text": "how are you?"}]
    answers = [
        client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": content}], **GREEDY)
        for content in (parts, "Hello,\nhow are you?")
    ]
    assert token_counts(answers[0].usage) == token_counts(answers[1].usage)
    assert answers[0].choices[0].message.content == answers[1].choices[0].message.content


def test_a_message_name_reaches_the_chat_template(model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}:{{ m.get('name', '-') }}]{{ m['content'] }}{% endfor %}"
    )
    messages = [
        ChatMessage(role="developer", content="Be brief."),
        ChatMessage(role="user", content="Hi", name="ada"),
    ]
    assert render_chat(tokenizer, [m.for_template() for m in messages]) == "[system:-]Be brief.[user:ada]Hi"


def test_a_stop_token_is_in_the_token_ids_and_in_the_text_only_when_asked(model_dir: Path) -> None:
    llm = make_llm(model_dir)

    def run(**options: Any) -> CompletionOutput:
        return llm.generate("Hello world", SamplingParams(temperature=0.0, ignore_eos=True, **options))[0].outputs[0]

    free = run(max_tokens=12)
    # The first token after the first one that adds text, so that leaving its text out shows.
    stop = next(t for i, t in enumerate(free.token_ids) if i > 0 and i == free.token_ids.index(t) and (
        run(max_tokens=i + 1).text != run(max_tokens=i).text))  # fmt: skip
    before = free.token_ids.index(stop)
    stopped = run(max_tokens=12, stop_token_ids=[stop])
    assert stopped.token_ids == free.token_ids[: before + 1]
    assert (stopped.finish_reason, stopped.stop_reason) == ("stop", stop) and stopped.finished()
    assert stopped.text == run(max_tokens=before).text
    # As vLLM: include_stop_str_in_output keeps the stopping token's text, a special one's only
    # when special tokens are kept.
    kept = run(max_tokens=12, stop_token_ids=[stop], include_stop_str_in_output=True)
    assert kept.token_ids == stopped.token_ids and kept.text == run(max_tokens=before + 1).text
    eos = llm.get_tokenizer().eos_token_id
    forced = dict(max_tokens=4, logit_bias={eos: 100}, include_stop_str_in_output=True)
    ended = llm.generate("Hello world", SamplingParams(temperature=0.0, **forced))[0].outputs[0]
    assert ended.token_ids == [eos] and ended.text == ""
    kept_eos = llm.generate("Hello world", SamplingParams(temperature=0.0, skip_special_tokens=False, **forced))
    assert kept_eos[0].outputs[0].text == "<|end|>"


def test_a_configured_eos_besides_the_tokenizers_names_itself_as_the_stop_reason(
    model_dir: Path, tmp_path: Path
) -> None:
    """As vLLM, which makes generation_config's EOS ids other than the tokenizer's stop tokens:
    Llama 3.1 ends a tool call with <|eom_id|>, a turn with <|eot_id|>, and a client tells them apart."""
    path = tmp_path / "two-eos"
    shutil.copytree(model_dir, path)
    eos = AutoTokenizer.from_pretrained(path).eos_token_id
    other = 7
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos, other]}))
    llm = make_llm(path)
    for token, reason in ((eos, None), (other, other)):
        params = SamplingParams(temperature=0.0, max_tokens=4, logit_bias={token: 100})
        output = llm.generate("Hello world", params)[0].outputs[0]
        assert (output.token_ids, output.finish_reason, output.stop_reason) == ([token], "stop", reason)


def test_n_completions_for_each_prompt(client: openai.OpenAI, model_name: str) -> None:
    completion = client.completions.create(
        model=model_name, prompt=["Hello", "Once upon a time"], n=3, temperature=1.0, seed=7, max_tokens=6
    )
    assert sorted(choice.index for choice in completion.choices) == list(range(6))
    seeded_again = client.completions.create(
        model=model_name, prompt=["Hello", "Once upon a time"], n=3, temperature=1.0, seed=7, max_tokens=6
    )
    assert [c.text for c in seeded_again.choices] == [c.text for c in completion.choices]


def test_a_stream_of_n_choices_sends_one_choice_a_chunk(client: openai.OpenAI, model_name: str) -> None:
    """As OpenAI and vLLM stream them: a client reading ``choices[0]`` of each chunk gets every choice."""
    options = dict(model=model_name, n=3, temperature=1.0, seed=7, max_tokens=6)
    chat = dict(messages=[{"role": "user", "content": "Hi"}], **options)
    completion = dict(prompt=["Hello", "Once upon a time"], **options)
    for create, body, text in [
        (client.chat.completions.create, chat, lambda c: c.message.content),
        (client.completions.create, completion, lambda c: c.text),
    ]:
        expected = {c.index: text(c) for c in create(**body).choices}
        chunks = list(create(stream=True, **body))
        assert all(len(chunk.choices) == 1 for chunk in chunks)
        streamed: dict[int, str] = {}
        for chunk in chunks:
            choice = chunk.choices[0]
            piece = choice.delta.content if hasattr(choice, "delta") else choice.text
            streamed[choice.index] = streamed.get(choice.index, "") + (piece or "")
        assert streamed == expected


def test_stop_string_cuts_the_text(client: openai.OpenAI, model_name: str) -> None:
    prompt = "A paged KV cache"
    full = client.completions.create(
        model=model_name, prompt=prompt, temperature=0.0, max_tokens=24, extra_body={"ignore_eos": True}
    ).choices[0]
    stop = full.text[5:8]
    assert stop.strip(), f"no usable stop string in {full.text!r}"
    stopped = client.completions.create(
        model=model_name, prompt=prompt, temperature=0.0, max_tokens=24, stop=[stop], extra_body={"ignore_eos": True}
    ).choices[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[: full.text.index(stop)]
    # vLLM's stop_reason says which stop string matched; None where the length ended it.
    assert (stopped.model_extra["stop_reason"], full.model_extra["stop_reason"]) == (stop, None)
    chunks = client.completions.create(
        model=model_name, prompt=prompt, temperature=0.0, max_tokens=24, stop=["zzz", stop], stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert [chunk.choices[0].model_extra["stop_reason"] for chunk in chunks][-1] == stop
    messages = [{"role": "user", "content": prompt}]
    free = client.chat.completions.create(model=model_name, messages=messages, temperature=0.0, max_tokens=12)
    stop = free.choices[0].message.content[3:6]
    assert stop.strip(), f"no usable stop string in {free.choices[0].message.content!r}"
    for stream in (False, True):
        reply = client.chat.completions.create(
            model=model_name, messages=messages, temperature=0.0, max_tokens=12, stop=stop, stream=stream
        )
        last = list(reply)[-1].choices[0] if stream else reply.choices[0]
        assert (last.finish_reason, last.model_extra["stop_reason"]) == ("stop", stop)


def test_vllm_text_options_keep_the_stop_string_and_special_tokens(
    server: ServerThread, client: openai.OpenAI, model_name: str
) -> None:
    prompt = "A paged KV cache"
    full = client.completions.create(
        model=model_name, prompt=prompt, temperature=0.0, max_tokens=24, extra_body={"ignore_eos": True}
    ).choices[0]
    stop = full.text[5:8]
    kept = client.completions.create(
        model=model_name,
        prompt=prompt,
        temperature=0.0,
        max_tokens=24,
        stop=[stop],
        extra_body={"ignore_eos": True, "include_stop_str_in_output": True},
    ).choices[0]
    assert kept.text == full.text[: full.text.index(stop) + len(stop)]
    # Forced to a special token: left out of the text, or kept in it (and counted by the offsets).
    tokenizer = server.app.state.server.ready_model().tokenizer
    special = tokenizer.convert_tokens_to_ids("<|user|>")

    def forced(**extra: Any) -> Any:
        body = {"ignore_eos": True, "logit_bias": {str(special): 100}, **extra}
        return client.completions.create(
            model=model_name, prompt=prompt, max_tokens=3, logprobs=0, temperature=0.0, extra_body=body
        ).choices[0]

    skipped, kept = forced(), forced(skip_special_tokens=False)
    assert (skipped.text, skipped.logprobs.text_offset) == ("", [0, 0, 0])
    assert (kept.text, kept.logprobs.text_offset) == ("<|user|>" * 3, [0, 8, 16])


def test_logprobs_and_echo(client: openai.OpenAI, model_name: str) -> None:
    completion = client.completions.create(model=model_name, prompt="Hello world", logprobs=2, echo=True, **GREEDY)
    choice = completion.choices[0]
    assert choice.text.startswith("Hello world")
    logprobs = choice.logprobs
    assert logprobs is not None
    num_prompt = completion.usage.prompt_tokens
    assert len(logprobs.tokens) == num_prompt + completion.usage.completion_tokens
    assert logprobs.token_logprobs[0] is None and all(lp <= 0 for lp in logprobs.token_logprobs[1:])
    # Greedy: each generated token is the most likely one.
    for token, top in zip(logprobs.tokens[num_prompt:], logprobs.top_logprobs[num_prompt:]):
        assert top[token] == max(top.values())
    chat = client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": "Hi"}], logprobs=True, top_logprobs=3, **GREEDY
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(entry.top_logprobs) == 3 and entry.logprob == entry.top_logprobs[0].logprob for entry in content)


def test_echo_without_output_scores_the_prompt(client: openai.OpenAI, model_name: str) -> None:
    options = {"model": model_name, "prompt": "Hello world", "logprobs": 1, "echo": True, "temperature": 0}
    with_output = client.completions.create(max_tokens=3, **options)
    scored = client.completions.create(max_tokens=0, **options)
    (choice,) = scored.choices
    num_prompt = scored.usage.prompt_tokens
    assert choice.text == "Hello world" and choice.finish_reason == "length"
    assert scored.usage.completion_tokens == 0 and scored.usage.total_tokens == num_prompt
    assert choice.logprobs.tokens == with_output.choices[0].logprobs.tokens[:num_prompt]
    expected = with_output.choices[0].logprobs.token_logprobs[:num_prompt]
    assert choice.logprobs.token_logprobs == pytest.approx(expected, abs=1e-5)
    stream = client.completions.create(max_tokens=0, stream=True, stream_options={"include_usage": True}, **options)
    chunks = list(stream)
    assert "".join(c.text for chunk in chunks for c in chunk.choices) == "Hello world"
    assert chunks[-1].usage.completion_tokens == 0


def test_a_prompt_as_long_as_the_context_is_scored_but_not_continued(client: openai.OpenAI, model_name: str) -> None:
    # lm-eval-harness's loglikelihood requests: token ids cut to the context length, echo, no output.
    ids = [(i * 7) % 200 + 5 for i in range(256)]  # the fixture's max_model_len
    options = {"model": model_name, "logprobs": 1, "echo": True, "temperature": 0}
    full = client.completions.create(prompt=ids, max_tokens=0, **options).choices[0].logprobs.token_logprobs
    shorter = client.completions.create(prompt=ids[:-1], max_tokens=0, **options).choices[0].logprobs.token_logprobs
    assert len(full) == 256 and full[0] is None
    assert full[:-1] == pytest.approx(shorter, abs=1e-5)
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(prompt=ids, max_tokens=1, **options)
    assert refused.value.body["code"] == "context_length_exceeded"


@pytest.mark.parametrize("echo", [False, True])
def test_streamed_logprobs_add_up_to_the_whole_ones(client: openai.OpenAI, model_name: str, echo: bool) -> None:
    options = {"model": model_name, "prompt": "Hello world", "logprobs": 1, "echo": echo, **GREEDY}
    choice = client.completions.create(**options).choices[0]
    whole = choice.logprobs
    parts = [c.logprobs for chunk in client.completions.create(stream=True, **options) for c in chunk.choices]
    # Offsets carry on from chunk to chunk, as if the stream were one response.
    assert [offset for part in parts for offset in part.text_offset] == whole.text_offset
    assert [token for part in parts for token in part.tokens] == whole.tokens
    # Each token the text holds whole (not a special token, not part of a character) is at its offset.
    placed = [
        (token, offset)
        for token, offset in zip(whole.tokens, whole.text_offset)
        if not token.startswith("bytes:") and token not in SPECIAL_TOKENS
    ]
    assert [choice.text[offset : offset + len(token)] for token, offset in placed] == [token for token, _ in placed]
    assert whole.text_offset == sorted(whole.text_offset) and whole.text_offset[-1] <= len(choice.text)


@pytest.fixture
def engine_params(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The SamplingParams each route hands the engine, in order (one per request)."""
    from neuron_llm.serve import chat, completions, tgi

    seen: list[Any] = []
    for module in (chat, completions, tgi):

        def recording(engine: Any, prompts: Any, params: Any, *args: Any, _make: Any = module.sampled) -> Any:
            seen.append(params[0] if isinstance(params, list) else params)
            return _make(engine, prompts, params, *args)

        monkeypatch.setattr(module, "sampled", recording)
    return seen


def test_sampling_fields_reach_the_engine(
    client: openai.OpenAI, model_name: str, server: ServerThread, engine_params: list[Any]
) -> None:
    """The model never repeats a token greedily, so the penalties cannot show in its text."""
    sampling = {"presence_penalty": 1.5, "frequency_penalty": -0.5, "top_p": 0.9}
    extra = {"top_k": 7, "min_p": 0.1, "repetition_penalty": 1.2}
    client.completions.create(model=model_name, prompt="Hello", max_tokens=2, extra_body=extra, **sampling)
    client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": "Hi"}], max_tokens=2, extra_body=extra, **sampling
    )
    tgi = {"max_new_tokens": 2, "frequency_penalty": 0.7, "top_k": 7, "top_p": 0.9, "repetition_penalty": 1.2}
    assert httpx.post(f"{server.url}/invocations", json={"inputs": "Hi", "parameters": tgi}).status_code == 200
    fields = ("presence_penalty", "frequency_penalty", "top_p", "top_k", "min_p", "repetition_penalty")
    got = [{name: getattr(params, name) for name in fields} for params in engine_params]
    assert got[:2] == [{**sampling, **extra}] * 2
    assert {name: got[2][name] for name in tgi if name != "max_new_tokens"} == {
        k: v for k, v in tgi.items() if k != "max_new_tokens"
    }


def test_logit_bias_reaches_the_engine_and_forces_a_token(
    client: openai.OpenAI, model_name: str, server: ServerThread, engine_params: list[Any]
) -> None:
    tokenizer = server.app.state.server.ready_model().tokenizer
    forced = tokenizer.encode("the")[0]
    completion = client.completions.create(
        model=model_name, prompt="Hello", max_tokens=4, temperature=1.0, logit_bias={str(forced): 100}
    )
    assert completion.choices[0].text == tokenizer.decode([forced] * 4)
    messages = [{"role": "user", "content": "Hi"}]
    client.chat.completions.create(model=model_name, messages=messages, max_tokens=1, logit_bias={"3": -100, "5": 2})
    assert [params.logit_bias for params in engine_params] == [{forced: 100.0}, {3: -100.0, 5: 2.0}]


def test_allowed_token_ids_and_bad_words_reach_the_engine(
    client: openai.OpenAI, model_name: str, server: ServerThread, engine_params: list[Any]
) -> None:
    tokenizer = server.app.state.server.ready_model().tokenizer
    allowed = tokenizer.encode(" the", add_special_tokens=False)[:1]
    extra = {"allowed_token_ids": allowed, "bad_words": ["fox"]}
    completion = client.completions.create(model=model_name, prompt="Hello", max_tokens=3, extra_body=extra)
    assert completion.choices[0].text == tokenizer.decode(allowed * 3)
    messages = [{"role": "user", "content": "Hi"}]
    client.chat.completions.create(model=model_name, messages=messages, max_tokens=1, extra_body=extra)
    assert [(params.allowed_token_ids, params.bad_words) for params in engine_params] == [(allowed, ["fox"])] * 2


def test_metrics_time_each_request_from_arrival(client: openai.OpenAI, model_name: str, server: ServerThread) -> None:
    names = ("request_queue_time", "time_to_first_token", "e2e_request_latency", "inter_token_latency")

    def histograms() -> dict[str, tuple[float, float]]:
        return {
            name: (metric(server, f"neuron_llm_{name}_seconds_count"), metric(server, f"neuron_llm_{name}_seconds_sum"))
            for name in names
        }

    before = histograms()
    client.completions.create(
        model=model_name, prompt="Hello", max_tokens=4, temperature=0.0, extra_body={"ignore_eos": True}
    )
    after = histograms()
    counts = {name: after[name][0] - before[name][0] for name in names}
    assert counts == {
        "request_queue_time": 1,
        "time_to_first_token": 1,
        "e2e_request_latency": 1,
        "inter_token_latency": 3,
    }
    queued, first, whole = (after[name][1] - before[name][1] for name in names[:3])
    assert 0 <= queued <= first <= whole


def test_errors_surface_as_the_clients_exceptions(client: openai.OpenAI, model_name: str) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=model_name, prompt="Hi", temperature=-1)
    assert bad.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model=model_name, prompt="Hello world " * 200)
    assert too_long.value.body["param"] == "prompt" and too_long.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "Hi"}])
    assert missing.value.body["param"] == "model"


def test_generation_config_fills_the_sampling_fields_a_request_leaves_out(model_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(model_dir, tmp_path, dirs_exist_ok=True)
    config_path = tmp_path / "generation_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    # Greedy, with a penalty that forbids every repeat: visible in any greedy output that repeats.
    config_path.write_text(json.dumps({**config, "temperature": 0.0, "repetition_penalty": 1e6}))
    body = {"prompt": "Hello world", "max_tokens": 40, "ignore_eos": True, "seed": 0}
    with running_server(tmp_path, load=lambda: make_llm(tmp_path)) as server:
        url = f"{server.url}/v1/completions"
        defaults = httpx.post(url, json=body).json()["choices"][0]["text"]
        again = httpx.post(url, json={**body, "seed": 1}).json()["choices"][0]["text"]
        greedy = httpx.post(url, json={**body, "repetition_penalty": 1.0}).json()["choices"][0]["text"]
        sampled = httpx.post(url, json={**body, "repetition_penalty": 1.0, "temperature": 1.5}).json()
        chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 40, "ignore_eos": True}
        chat_url = f"{server.url}/v1/chat/completions"
        chat_defaults = httpx.post(chat_url, json=chat).json()["choices"][0]["message"]["content"]
        chat_greedy = httpx.post(chat_url, json={**chat, "repetition_penalty": 1.0})
        chat_greedy = chat_greedy.json()["choices"][0]["message"]["content"]
    assert chat_defaults != chat_greedy, "chat takes the model's defaults too"
    assert defaults == again, "temperature 0 came from the model's defaults: seeds change nothing"
    assert defaults != greedy, "the penalty came from the model's defaults"
    assert sampled["choices"][0]["text"] != greedy


def test_api_key_is_required_when_set(model_dir: Path) -> None:
    with running_server(model_dir, api_key="secret") as keyed:
        wrong = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        # A GET refused is not counted as a refused request; a POST is.
        assert metric(keyed, 'neuron_llm_requests_total{outcome="invalid"}') == 0
        with pytest.raises(openai.AuthenticationError):
            wrong.completions.create(model="any", prompt="Hi", max_tokens=2)
        assert metric(keyed, 'neuron_llm_requests_total{outcome="invalid"}') == 1
        right = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="secret", max_retries=0)
        assert right.completions.create(model=right.models.list().data[0].id, prompt="Hi", max_tokens=2).choices
        # /invocations generates too, so the key guards it as well; /ping stays open for health checks.
        body = {"prompt": "Hi", "max_tokens": 2}
        assert httpx.post(f"{keyed.url}/invocations", json=body).status_code == 401
        headers = {"Authorization": "Bearer secret"}
        assert httpx.post(f"{keyed.url}/invocations", json=body, headers=headers).status_code == 200
        assert httpx.get(f"{keyed.url}/ping").status_code == 200
        # The key is checked before the body is read: a caller without it learns nothing of the parser.
        for path in ("/v1/completions", "/tokenize", "/invocations"):
            json_type = {"content-type": "application/json"}
            answer = httpx.post(f"{keyed.url}{path}", content=b"{not json", headers=json_type)
            assert answer.status_code == 401 and answer.json()["error"]["code"] == "invalid_api_key", path
            assert answer.headers["www-authenticate"] == "Bearer"
        assert metric(keyed, 'neuron_llm_requests_total{outcome="invalid"}') == 5
        assert httpx.get(f"{keyed.url}/metrics").status_code == 200


def test_browsers_may_call_from_the_allowed_origins_only(model_dir: Path, server: ServerThread) -> None:
    app = "https://app.example.com"
    preflight = {
        "Origin": app,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization",
    }
    # Unset, no page of another origin may call: no preflight answer, no CORS header.
    assert httpx.options(f"{server.url}/v1/completions", headers=preflight).status_code == 405
    assert "access-control-allow-origin" not in httpx.get(f"{server.url}/v1/models", headers={"Origin": app}).headers
    with running_server(model_dir, api_key="secret", allowed_origins=f"{app}, http://localhost:3000") as cors:
        answer = httpx.options(f"{cors.url}/v1/completions", headers=preflight)  # before the key is checked
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == app
        assert "authorization" in answer.headers["access-control-allow-headers"].lower()
        other = httpx.options(f"{cors.url}/v1/completions", headers={**preflight, "Origin": "https://evil.example"})
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
        headers = {"Origin": app, "Authorization": "Bearer secret"}
        listed = httpx.get(f"{cors.url}/v1/models", headers=headers)
        assert listed.status_code == 200 and listed.headers["access-control-allow-origin"] == app
        assert httpx.get(f"{cors.url}/v1/models", headers={"Origin": app}).status_code == 401
    for bad in ("app.example.com", "https://app.example.com/path", "ftp://x", ""):
        with pytest.raises(ValueError, match="allowed_origins="):
            ServeSettings(allowed_origins=bad)


def test_a_kv_pool_shorter_than_the_context_bounds_requests_without_max_tokens(model_dir: Path) -> None:
    # 32 blocks of 4 tokens: 31 usable hold one sequence of 125 tokens, under max_model_len 256.
    # A request without max_tokens (chat's usual case) gets the room the pool leaves, not a 400.
    with running_server(model_dir, load=lambda: make_llm(model_dir, num_kv_blocks=32)) as small:
        client = openai.OpenAI(base_url=f"{small.url}/v1", api_key="-", max_retries=0, timeout=60)
        (card,) = httpx.get(f"{small.url}/v1/models").json()["data"]
        assert card["max_model_len"] == 125
        chat = client.chat.completions.create(
            model=card["id"], messages=[{"role": "user", "content": "Hi"}], extra_body={"ignore_eos": True}
        )
        assert chat.choices[0].finish_reason == "length"
        assert chat.usage.prompt_tokens + chat.usage.completion_tokens == 125
        with pytest.raises(openai.BadRequestError) as too_many:
            client.completions.create(model=card["id"], prompt="Hi", max_tokens=200)
        assert too_many.value.body["param"] == "max_tokens" and "125 tokens" in too_many.value.body["message"]
        # Scoring: the pool must hold the prompt's keys and values, so 124 tokens, not 125.
        ids = [(i * 7) % 200 + 5 for i in range(125)]
        options = {"model": card["id"], "logprobs": 1, "echo": True, "max_tokens": 0}
        scored = client.completions.create(prompt=ids[:-1], **options).choices[0].logprobs.token_logprobs
        assert len(scored) == 124
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(prompt=ids, **options)
        assert refused.value.body["code"] == "context_length_exceeded"
    # truncate_prompt_tokens=-1 keeps what the pool leaves room for, offline as in the server.
    llm = make_llm(model_dir, num_kv_blocks=32)
    prompt = {"prompt_token_ids": list(range(5, 205))}
    (output,) = llm.generate([prompt], SamplingParams(max_tokens=1, truncate_prompt_tokens=-1))
    assert output.prompt_token_ids == list(range(81, 205))


def test_without_max_tokens_each_prompt_may_fill_the_context(client: openai.OpenAI, model_name: str) -> None:
    """Not only the room the longest prompt of the batch leaves (max_model_len 256 here)."""
    long_prompt = [5] * 250
    completion = client.completions.create(
        model=model_name,
        prompt=[[5, 6], long_prompt],
        max_tokens=None,
        temperature=0.0,
        extra_body={"ignore_eos": True},
    )
    short, long = sorted(completion.choices, key=lambda choice: choice.index)
    assert (short.finish_reason, long.finish_reason) == ("length", "length")
    assert completion.usage.completion_tokens == (256 - 2) + (256 - 250)


def test_a_chat_history_sent_back_as_the_client_returned_it(client: openai.OpenAI, model_name: str) -> None:
    messages: list[Any] = [{"role": "user", "content": "Hi"}]
    reply = client.chat.completions.create(model=model_name, messages=messages, **GREEDY)
    # The client's message carries refusal, tool_calls, audio... as null.
    messages += [reply.choices[0].message.model_dump(), {"role": "user", "content": "And then?"}]
    again = client.chat.completions.create(model=model_name, messages=messages, **GREEDY)
    assert again.choices[0].finish_reason in ("stop", "length")
    tool = {"role": "tool", "content": "42", "tool_call_id": "call_1"}
    answered = client.chat.completions.create(model=model_name, messages=[*messages, tool], **GREEDY)
    assert answered.usage.prompt_tokens > again.usage.prompt_tokens


def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens(model_dir: Path) -> None:
    llm = make_llm(model_dir, max_model_len=64)
    greedy = dict(temperature=0.0, max_tokens=6, ignore_eos=True)
    prompt_ids = llm.get_tokenizer().encode("A paged KV cache keeps each sequence's keys and values in blocks")
    assert len(prompt_ids) > 5
    [cut] = llm.generate("A paged KV cache keeps each sequence's keys and values in blocks", SamplingParams(
        truncate_prompt_tokens=5, **greedy))  # fmt: skip
    [last] = llm.generate({"prompt_token_ids": prompt_ids[-5:]}, SamplingParams(**greedy))
    assert cut.prompt_token_ids == prompt_ids[-5:] and cut.outputs[0].token_ids == last.outputs[0].token_ids
    # -1: as many as leave room for one output token (a prompt filling the context is refused).
    [longest] = llm.generate({"prompt_token_ids": [7] * 80}, SamplingParams(truncate_prompt_tokens=-1, **greedy))
    assert longest.prompt_token_ids == [7] * 63
    assert len(longest.outputs[0].token_ids) == 1 and longest.outputs[0].finish_reason == "length"
    [short] = llm.generate({"prompt_token_ids": [7] * 3}, SamplingParams(truncate_prompt_tokens=-1, **greedy))
    assert short.prompt_token_ids == [7] * 3
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match=r"truncate_prompt_tokens=.*must be None, -1"):
            SamplingParams(truncate_prompt_tokens=bad)


def test_routes_truncate_prompts_as_asked(server: ServerThread, client: openai.OpenAI, model_name: str) -> None:
    tokenizer = server.app.state.server.ready_model().tokenizer
    text = "Once upon a time a paged KV cache kept every sequence's keys"
    ids = tokenizer.encode(text)
    assert len(ids) > 4
    options = dict(model=model_name, temperature=0.0, max_tokens=5, extra_body={"ignore_eos": True})
    expected = client.completions.create(prompt=ids[-4:], echo=True, **options).choices[0].text
    cut = client.completions.create(
        prompt=text, echo=True, **{**options, "extra_body": {"ignore_eos": True, "truncate_prompt_tokens": 4}}
    )
    assert cut.choices[0].text == expected and cut.usage.prompt_tokens == 4
    chat = client.chat.completions.create(
        messages=[{"role": "user", "content": text}],
        **{**options, "extra_body": {"ignore_eos": True, "truncate_prompt_tokens": 3}},
    )
    assert chat.usage.prompt_tokens == 3
    tgi = {"inputs": text, "parameters": {"max_new_tokens": 5, "truncate": 4}}
    answered = httpx.post(f"{server.url}/invocations", json=tgi).json()[0]["generated_text"]
    assert tokenizer.decode(ids[-4:]) + answered == expected
    bad = httpx.post(f"{server.url}/v1/completions", json={"prompt": text, "truncate_prompt_tokens": 0})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "truncate_prompt_tokens"

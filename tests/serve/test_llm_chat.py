"""``LLM.generate`` and ``LLM.chat`` take vLLM's input forms (on the chat model the server tests use)."""

from __future__ import annotations

import random
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from neuron_llm.llm import LLM
from neuron_llm.loader.tokenizer import bad_word_token_ids
from neuron_llm.sample.sampler import NoTokenLeftError
from neuron_llm.sampling_params import SamplingParams
from tests.serve.conftest import make_llm, unmerged_characters

GREEDY = SamplingParams(temperature=0.0, max_tokens=6)


@pytest.fixture(scope="module")
def llm(model_dir: Path) -> LLM:
    return make_llm(model_dir)


def test_prompt_forms_give_the_same_output(llm: LLM) -> None:
    ids = llm.tokenizer.encode("Hello world")
    forms = ["Hello world", {"prompt": "Hello world"}, {"prompt_token_ids": ids}, {"prompt_token_ids": np.array(ids)}]
    outputs = [llm.generate(form, GREEDY)[0].outputs[0].token_ids for form in forms]
    assert all(output == outputs[0] for output in outputs)
    with pytest.raises(ValueError, match="sampling_params must be SamplingParams or a list of them, not dict"):
        llm.generate("Hello", {"max_tokens": 3})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"prompt 0: a prompt must be a string, \{'prompt': str\}"):
        llm.generate({"text": "Hello"}, GREEDY)


@pytest.mark.parametrize(
    "prompt",
    [
        {"prompt": "Hello", "multi_modal_data": {"image": "x"}},  # vLLM's, which this engine would ignore
        {"prompt": "Hello", "promt_token_ids": [1]},
        {"prompt": "Hello", "prompt_token_ids": [5, 6]},  # which one?
        {"prompt_token_ids": 5},
        {"prompt_token_ids": "Hello"},
    ],
)
def test_a_prompt_dict_with_anything_unread_is_refused(llm: LLM, prompt: dict) -> None:
    with pytest.raises(ValueError, match=r"prompt 0: (a prompt must be|prompt_token_ids must be a list)"):
        llm.generate(prompt, GREEDY)
    assert not llm.engine.has_unfinished_requests()


def test_half_a_surrogate_pair_is_refused_by_name(llm: LLM) -> None:
    # A string cut inside an emoji: the tokenizer's own error named no field.
    with pytest.raises(ValueError, match=r"the prompt holds a lone UTF-16 surrogate \('\\ud83d' at character 4\)"):
        llm.generate("cut \ud83d", GREEDY)
    with pytest.raises(ValueError, match=r"the conversation holds a lone UTF-16 surrogate"):
        llm.chat([{"role": "user", "content": "cut \ud83d"}], GREEDY)
    assert not llm.engine.has_unfinished_requests()


def test_open_streams_and_generate_each_get_all_their_outputs(llm: LLM) -> None:
    """Every step advances every request; no caller may drop another's outputs."""
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    alone = [llm.generate(prompt, params)[0].outputs[0].token_ids for prompt in ("Hello", "world", "fox")]
    first, second = llm.stream("Hello", params), llm.stream("world", params)
    read_first = [next(first)]
    read_second = [next(second)]
    read_first += list(first)  # runs past the second stream's steps too
    between = llm.generate("fox", params)[0].outputs[0].token_ids
    read_second += list(second)
    for outputs, expected in ((read_first, alone[0]), (read_second, alone[1])):
        assert outputs[-1].finished and not any(output.finished for output in outputs[:-1])
        assert outputs[-1].outputs[0].token_ids == expected
    assert between == alone[2]
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("output_kind", ["cumulative", "delta"])
def test_a_stream_left_unread_holds_its_latest_output(llm: LLM, output_kind: str) -> None:
    # As AsyncLLM's: a cumulative output holds everything before it, so one unread is kept,
    # not a copy of the tokens so far per step; deltas are each kept, in order.
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, output_kind=output_kind)
    alone = llm.generate("Hello", params)[0].outputs[0].token_ids
    stream = llm.stream("Hello", params)
    read = [next(stream)]
    llm.generate("world", replace(params, max_tokens=10, output_kind="cumulative"))  # ten steps of the stream
    read += list(stream)
    tokens = [output.outputs[0].token_ids for output in read]
    if output_kind == "delta":
        assert [len(delta) for delta in tokens[:11]] == [1] * 11
        assert sum(tokens, []) == alone
    else:
        assert len(tokens[1]) >= 11 and tokens[-1] == alone
    assert not llm.engine.has_unfinished_requests()


def test_vllms_text_options_are_taken(llm: LLM) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    (with_text,) = llm.generate("Hello", params)
    (ids_only,) = llm.generate("Hello", replace(params, detokenize=False))
    assert ids_only.outputs[0].text == "" and with_text.outputs[0].text
    assert ids_only.outputs[0].token_ids == with_text.outputs[0].token_ids
    (spaced,) = llm.generate("Hello", replace(params, spaces_between_special_tokens=False))
    assert spaced.outputs[0].text == with_text.outputs[0].text  # a fast tokenizer's text either way
    with pytest.raises(ValueError, match="stop strings need detokenize=True"):
        SamplingParams(stop=["x"], detokenize=False)
    with pytest.raises(ValueError, match="detokenize=1: must be a bool"):
        SamplingParams(detokenize=1)


def test_chat_options_reach_the_template(llm: LLM) -> None:
    conversation = [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}]
    (output,) = llm.chat(conversation, GREEDY)
    assert output.prompt == "<|user|>Hi\nthere<|end|><|assistant|>"
    template = "{{ prefix }}{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    (custom,) = llm.chat(
        [{"role": "assistant", "content": "Once"}],
        GREEDY,
        chat_template=template,
        add_generation_prompt=False,
        continue_final_message=True,
        chat_template_kwargs={"prefix": "!"},
    )
    assert custom.prompt == "![Once"  # left open after the last message, for the model to continue
    # As in vLLM, chat_template_kwargs may set the named options too.
    (overridden,) = llm.chat(conversation, GREEDY, chat_template_kwargs={"add_generation_prompt": False})
    assert overridden.prompt == "<|user|>Hi\nthere<|end|>"
    tool = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
    tools_template = "{% for t in tools %}{{ t.function.name }};{% endfor %}{{ messages[0]['content'] }}"
    (offered,) = llm.chat([{"role": "user", "content": "Hi"}], GREEDY, chat_template=tools_template, tools=[tool])
    assert offered.prompt == "get_time;Hi"
    assert custom.outputs[0].token_ids == llm.generate({"prompt": "![Once"}, GREEDY)[0].outputs[0].token_ids
    with pytest.raises(ValueError, match="messages is empty"):
        llm.chat([], GREEDY)
    for taken in ("messages", "tokenize", "return_dict"):
        with pytest.raises(ValueError, match=rf"chat_template_kwargs: \['{taken}'\] are not template variables"):
            llm.chat(conversation, GREEDY, chat_template_kwargs={taken: True})


def _contains(tokens: list[int], word: list[int]) -> bool:
    return any(tokens[i : i + len(word)] == word for i in range(len(tokens) - len(word) + 1))


@pytest.mark.parametrize(
    "engine_options", [{}, {"async_scheduling": True}, {"speculative_config": {"num_speculative_tokens": 3}}]
)
def test_bad_words_are_never_generated(model_dir: Path, engine_options: dict) -> None:
    llm = make_llm(model_dir, **engine_options)
    greedy = SamplingParams(temperature=0.0, max_tokens=24)
    free_run = llm.generate("Hello", greedy)[0].outputs[0].token_ids
    # A word of two tokens the free run writes (as the text of a window of it), and one of one token.
    words = []
    for size in (2, 1):
        for start in range(len(free_run) - size + 1):
            word = llm.tokenizer.decode(free_run[start : start + size])
            spellings = bad_word_token_ids(llm.tokenizer, [word]) if word.strip() else []
            if any(_contains(free_run, spelling) and len(spelling) == size for spelling in spellings):
                words.append(word)
                break
    assert len(words) == 2, free_run
    for banned_words in ([words[0]], words):
        spellings = bad_word_token_ids(llm.tokenizer, banned_words)
        for temperature in (0.0, 1.0):
            params = SamplingParams(temperature=temperature, max_tokens=24, bad_words=banned_words, seed=5)
            tokens = llm.generate("Hello", params)[0].outputs[0].token_ids
            assert not any(_contains(tokens, spelling) for spelling in spellings), (banned_words, tokens)
    # Allowed tokens that a one-token word bans, every one: nothing would be left to sample.
    single = [spelling[0] for spelling in bad_word_token_ids(llm.tokenizer, words[1:]) if len(spelling) == 1]
    with pytest.raises(ValueError, match=r"allowed_token_ids=\[.*\]: bad_words ban each, so no token"):
        llm.generate("Hello", SamplingParams(allowed_token_ids=single, bad_words=words[1:]))
    stop = next(token for token in range(100) if token not in single)
    held = SamplingParams(allowed_token_ids=[*single, stop], bad_words=words[1:], stop_token_ids=[stop], min_tokens=1)
    with pytest.raises(ValueError, match=r": bad_words ban some, and each other one ends the sequence while min_tok"):
        llm.generate("Hello", held)
    # As decoding would have gone but for the word: the same tokens up to where it first ends.
    first = min(
        i + len(s) - 1
        for s in bad_word_token_ids(llm.tokenizer, words[:1])
        for i in range(len(free_run))
        if free_run[i : i + len(s)] == s
    )
    steered = llm.generate("Hello", replace(greedy, bad_words=words[:1]))[0].outputs[0].token_ids
    assert steered[:first] == free_run[:first] and steered[first] != free_run[first]


def test_bad_words_that_ban_every_token_left_partway_fail_that_request_alone(llm: LLM) -> None:
    ids, words = unmerged_characters(llm.tokenizer)
    # Allowed either way first; after it, each pair is a bad word: the second token has none left.
    doomed = SamplingParams(temperature=1.0, seed=1, max_tokens=8, allowed_token_ids=ids, bad_words=words)
    message = f"bad_words={words!r}: at output token 2 they ban every token left by allowed_token_ids, so none could"
    with pytest.raises(ValueError, match=re.escape(message)):
        llm.generate("Hello", doomed)
    alone = llm.generate("Hi", GREEDY)[0].outputs[0].token_ids
    llm.engine.add_request("Hello", doomed, request_id="doomed")
    llm.engine.add_request("Hi", GREEDY, request_id="fine")
    finished = {}
    while llm.engine.has_unfinished_requests():
        finished.update({output.request_id: output for output in llm.engine.step() if output.finished})
    failures = dict(llm.engine.take_failures())
    assert list(failures) == ["doomed"] and isinstance(failures["doomed"], NoTokenLeftError)
    assert list(finished) == ["fine"] and finished["fine"].outputs[0].token_ids == alone


def test_random_constraints_never_give_a_forbidden_token_and_fail_only_with_none_left(llm: LLM) -> None:
    ids, _ = unmerged_characters(llm.tokenizer, count=3)
    text = {token_id: llm.tokenizer.decode([token_id]) for token_id in ids}
    eos = llm.tokenizer.eos_token_id
    rng = random.Random(0)
    for trial in range(30):
        chosen = rng.sample(ids, rng.randint(1, 3))
        allowed = chosen + ([eos] if rng.random() < 0.3 else [])
        # Words mostly of allowed tokens, so that some paths run out of them.
        pool = chosen + rng.sample(ids, 1)
        spellings = [[rng.choice(pool) for _ in range(rng.randint(2, 3))] for _ in range(rng.randint(1, 6))]
        min_tokens = rng.choice([0, 0, 2, 4])
        params = SamplingParams(
            temperature=0.0, max_tokens=10, allowed_token_ids=allowed, min_tokens=min_tokens,
            bad_words=["".join(text[t] for t in spelling) for spelling in spellings],
        )  # fmt: skip
        output: list[int] = []
        try:
            for step in llm.stream("Hello", params):
                output = list(step.outputs[0].token_ids)
        except ValueError as error:
            # Failed: after what it wrote, every allowed token is banned or held back.
            assert isinstance(error.__cause__, NoTokenLeftError), (trial, error)
            banned = {s[-1] for s in spellings if output[len(output) - len(s) + 1 :] == s[:-1]}
            held = {eos} if len(output) < min_tokens else set()
            assert set(allowed) <= banned | held, (trial, output, params)
            continue
        assert set(output) <= set(allowed), (trial, output)
        assert not any(output[i : i + len(s)] == s for s in spellings for i in range(len(output))), (trial, output)
        assert eos not in output[:min_tokens], (trial, output)


class _Proposes:
    def __init__(self, token_ids: list[int]) -> None:
        self.token_ids = token_ids

    def propose(self, token_ids: Any) -> list[int]:
        return self.token_ids


def test_a_token_with_none_left_is_never_generated_past_kept_proposals(model_dir: Path) -> None:
    plain, speculating = make_llm(model_dir), make_llm(model_dir, speculative_config={"num_speculative_tokens": 3})
    (a, _), (word, *_) = unmerged_characters(plain.tokenizer)
    # Only the token itself, banned after two of it: the third token has none left.
    params = SamplingParams(temperature=0.0, max_tokens=8, allowed_token_ids=[a], bad_words=[word[0] * 3])
    # Proposed after the first: the first proposal is kept, and the row after it has no token.
    speculating.engine.proposer = _Proposes([a] * 3)
    message = "at output token 3 they ban every token left by allowed_token_ids, so none could be generated"
    for llm in (plain, speculating):
        with pytest.raises(ValueError, match=re.escape(message)):
            llm.generate("Hello", params)
    assert speculating.engine.stats().num_draft_tokens > 0


def test_a_kept_proposal_that_stops_the_sequence_spares_it_the_dead_end_after(model_dir: Path) -> None:
    plain, speculating = make_llm(model_dir), make_llm(model_dir, speculative_config={"num_speculative_tokens": 3})
    (a, b), _ = unmerged_characters(plain.tokenizer)
    word = {token_id: plain.tokenizer.decode([token_id]) for token_id in (a, b)}
    # a first; then only b, the stop token; after b no token is left (a dead end never reached).
    bad_words = [word[a] + word[a], word[b] + word[a], word[b] + word[b]]
    params = SamplingParams(
        temperature=0.0, max_tokens=8, allowed_token_ids=[a, b], stop_token_ids=[b],
        logit_bias={a: 100.0, b: 50.0}, bad_words=bad_words,
    )  # fmt: skip
    speculating.engine.proposer = _Proposes([b, a, a])  # b kept, then the row with none left
    outputs = [llm.generate("Hello", params)[0].outputs[0] for llm in (plain, speculating)]
    assert [(output.token_ids, output.finish_reason) for output in outputs] == [([a, b], "stop")] * 2
    assert speculating.engine.stats().num_accepted_tokens == 1


def test_engine_options_are_checked_before_loading(tmp_path: Path, model_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown LLM option\(s\) \['swap_space'\]"):
        LLM(model=str(tmp_path / "not-loaded"), swap_space=4)
    with pytest.raises(ValueError, match=r"warm_up='no': must be None or a bool"):
        LLM(model=str(tmp_path / "not-loaded"), warm_up="no")
    for timeout in (-1, 1e300):
        with pytest.raises(
            ValueError, match=re.escape(f"distributed_timeout={timeout}: must be a number of seconds > 0, at")
        ):
            LLM(model=str(model_dir), distributed_timeout=timeout)
    llm = make_llm(model_dir, gpu_memory_utilization=0.5, distributed_timeout=30)  # vLLM's name, and ours
    assert llm.config.cache.memory_fraction == 0.5 and llm.config.parallel.distributed_timeout == 30
    assert llm.get_tokenizer() is llm.tokenizer is not None


def test_text_whose_tokens_the_model_lacks_is_refused_alone(extra_token_model_dir: Path) -> None:
    llm = make_llm(extra_token_model_dir)
    vocab_size = llm.engine.config.model.vocab_size
    assert llm.tokenizer.convert_tokens_to_ids("<extra>") == vocab_size
    llm.engine.add_request("Hello world", GREEDY, request_id="good")
    with pytest.raises(ValueError, match=rf"the prompt's tokens \[{vocab_size}\] are not in the vocabulary"):
        llm.engine.add_request("Hello <extra>", GREEDY, request_id="bad")
    outputs = []
    while llm.engine.has_unfinished_requests():
        outputs += [output for output in llm.engine.step() if output.finished]
    assert [output.request_id for output in outputs] == ["good"]

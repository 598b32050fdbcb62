"""Logprobs name their tokens by text (``Logprob.decoded_token``), as vLLM's do."""

from __future__ import annotations

from pathlib import Path

from neuron_llm.outputs import Logprob
from neuron_llm.sampling_params import SamplingParams
from tests.engine.conftest import make_llm as make_tokenless_llm
from tests.engine.conftest import tiny_model_dir  # noqa: F401
from tests.serve.conftest import make_llm


def test_every_logprob_carries_its_tokens_text(model_dir: Path) -> None:
    llm = make_llm(model_dir)
    tokenizer = llm.engine.tokenizer
    params = SamplingParams(temperature=0.0, max_tokens=4, logprobs=3, prompt_logprobs=2)
    output = llm.generate("a cat sat on the mat", params)[0]
    completion = output.outputs[0]
    sampled, prompt = completion.logprobs, output.prompt_logprobs[1:]
    assert len(sampled) == len(completion.token_ids) and len(prompt) == len(output.prompt_token_ids) - 1
    entries: list[dict[int, Logprob]] = [*sampled, *prompt]
    assert all(len(entry) >= 3 for entry in sampled) and all(len(entry) >= 2 for entry in prompt)
    for entry in entries:
        for token_id, logprob in entry.items():
            assert logprob.decoded_token == tokenizer.decode([token_id], clean_up_tokenization_spaces=False)
    # The texts of the sampled tokens spell the completion (greedy, no stop string).
    assert "".join(entry[t].decoded_token for entry, t in zip(sampled, completion.token_ids)) == completion.text


def test_without_a_tokenizer_logprobs_have_no_text(tiny_model_dir: Path) -> None:  # noqa: F811
    llm = make_tokenless_llm(tiny_model_dir)
    output = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=2, logprobs=1))[0]
    entries = output.outputs[0].logprobs
    assert entries and all(logprob.decoded_token is None for entry in entries for logprob in entry.values())


def test_chat_top_logprobs_keep_their_number_when_the_sampled_token_ties() -> None:
    """A sampled token tied with others carries the last of their ranks (3 here, at position 2
    of the top tokens): the top list is chosen by logprob, so it still holds two tokens."""
    from neuron_llm.detokenizer import TokenTexts
    from neuron_llm.serve.logprobs import chat_logprobs

    entry = {5: Logprob(-1.0, 3), 7: Logprob(-1.0, 1), 8: Logprob(-1.0, 3), 9: Logprob(-3.0, 4)}
    content = chat_logprobs(TokenTexts(None), [5], [entry], num_top=2).content
    assert [top.token for top in content[0].top_logprobs] == ["token_id:7", "token_id:5"]

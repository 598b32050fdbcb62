"""Fixtures of the quantization tests: a tiny random Llama checkpoint, with a word-level tokenizer."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from neuron_llm.loader import LoadedModel, load_model

QUANT_LLAMA = {
    "num_hidden_layers": 4,  # the fp8 recipe keeps the first and last in 16-bit: two are quantized
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    # The usual initialization: the ±0.2 of the shared fixture makes a chaotic model that
    # amplifies any perturbation, quantization included, far beyond what trained models do.
    "initializer_range": 0.02,
}
WORDS = [f"w{i}" for i in range(250)]


def save_word_tokenizer(path: Path) -> None:
    """A whitespace word-level tokenizer over ``WORDS`` (ids 0..249, "[UNK]" 250), saved to ``path``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(WORDS)} | {"[UNK]": len(WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(str(path))


@pytest.fixture
def quant_checkpoint(save_tiny_llama: Callable[..., tuple[Any, Path]]) -> tuple[Any, Path]:
    """(transformers model, directory) of a saved tiny random Llama with a tokenizer."""
    hf_model, path = save_tiny_llama(**QUANT_LLAMA)
    save_word_tokenizer(path)
    return hf_model, path


@pytest.fixture
def load_fp32() -> Callable[[Path], LoadedModel]:
    """Factory: load a checkpoint directory in float32 on the CPU."""
    return lambda path: load_model(path, dtype=torch.float32, device="cpu")


@pytest.fixture
def prompt() -> list[int]:
    """24 random token ids of the tiny vocabulary."""
    return torch.randint(0, 250, (24,), generator=torch.Generator().manual_seed(1)).tolist()

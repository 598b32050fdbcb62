"""A checkpoint is read as itself, whatever lies beside it or inside it that it does not use."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from neuron_llm.loader import load_model
from neuron_llm.loader.tokenizer import load_gguf_tokenizer
from tests.tokenizer_kinds import byte_level_bpe, sentencepiece_bpe


def write_gguf_with_tokenizer(path: Path, tokenizer: Any) -> None:
    """A GGUF holding ``tokenizer`` (a byte-level BPE) as llama.cpp's converter writes it; no weights."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = sorted(spec["vocab"], key=spec["vocab"].get)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.NORMAL] * len(tokens))
    writer.add_token_merges([" ".join(merge) if isinstance(merge, list) else merge for merge in spec["merges"]])
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_gguf_tokenizer_is_its_own_beside_another_models_files(tmp_path: Path) -> None:
    # llama.cpp converts in place: the GGUF lies among the tokenizer files of the model it came from.
    own, other = byte_level_bpe(), sentencepiece_bpe()
    path = tmp_path / "model.gguf"
    write_gguf_with_tokenizer(path, own)
    other.save_pretrained(tmp_path)
    tokenizer = load_gguf_tokenizer(path)
    text = "the quick brown fox"
    assert own.encode(text) != other.encode(text)
    assert len(tokenizer) == len(own)
    assert tokenizer.encode(text, add_special_tokens=False) == own.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("stored_head", ["the embedding", "another matrix"])
def test_a_stored_head_the_config_ties_away_is_ignored_and_a_differing_one_said(
    save_tiny_llama: Callable[..., tuple[Any, Path]], caplog: pytest.LogCaptureFixture, stored_head: str
) -> None:
    hf_model, path = save_tiny_llama(tie_word_embeddings=True)
    tensors = load_file(path / "model.safetensors")
    embedding = tensors["model.embed_tokens.weight"]
    tensors["lm_head.weight"] = embedding.clone() if stored_head == "the embedding" else torch.randn_like(embedding)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING, logger="neuron_llm.loader.weights"):
        loaded = load_model(path, dtype=torch.float32, device="cpu")
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    assert torch.equal(loaded.model.lm_head.weight, embedding)
    warned = [record.getMessage() for record in caplog.records if "lm_head.weight" in record.getMessage()]
    assert len(warned) == (stored_head == "another matrix"), warned

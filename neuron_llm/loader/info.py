"""What the engine needs to know about a model before any weight is read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from neuron_llm.config import ModelConfig
from neuron_llm.loader import gguf_file, hf_dir
from neuron_llm.loader.tokenizer import eos_token_ids, has_tokenizer_files, load_dir_tokenizer, load_gguf_tokenizer


@dataclass(frozen=True)
class ModelInfo:
    source: Path
    """The directory or GGUF file the model is read from."""
    config: ModelConfig
    tokenizer: PreTrainedTokenizerBase | None
    eos_token_ids: tuple[int, ...]


def load_model_info(model: str | Path | None) -> ModelInfo:
    """Resolve ``model`` (None: the default model) and read its config and tokenizer; no weights."""
    from neuron_llm.loader import resolve_model_path

    path = resolve_model_path(model)
    if path.suffix == ".gguf":
        config = gguf_file.read_gguf_config(gguf_file.open_gguf(path), path)
        tokenizer = load_gguf_tokenizer(path)
        return ModelInfo(path, config, tokenizer, eos_token_ids(tokenizer, config.eos_token_ids))
    config = hf_dir.read_model_config(path)
    tokenizer = load_dir_tokenizer(path) if has_tokenizer_files(path) else None
    generation_eos = hf_dir.read_generation_defaults(path).eos_token_ids
    return ModelInfo(path, config, tokenizer, eos_token_ids(tokenizer, config.eos_token_ids, generation_eos))

"""Loading a model in any weight format: 16-bit, a compressed-tensors checkpoint, or quantized on load.

The quantized counterpart of ``neuron_llm.loader.load_model``, built from the same pieces: the
model is built in place in its dtype and on its device, the checkpoint's quantized layers are
swapped in before any weight is read, and then every tensor is copied in once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from neuron_llm.compile.artifact import is_artifact
from neuron_llm.config import parse_dtype, require_visible
from neuron_llm.loader import LoadedModel, default_dtype, load_model, load_model_info, resolve_model_path
from neuron_llm.loader.hf_dir import iter_hf_weights
from neuron_llm.loader.weights import load_weights
from neuron_llm.models.llama import LlamaForCausalLM
from neuron_llm.quant.checkpoint import adapt_checkpoint_weights, read_quantization_config
from neuron_llm.quant.config import QuantConfig
from neuron_llm.quant.convert import prepare_quantized_model, quantize_model


def load_any_format(
    model: str | Path | None,
    *,
    dtype: torch.dtype | str,
    device: str | torch.device,
    quantization: str | QuantConfig | None = None,
    shard: Callable[[nn.Module], None] | None = None,
) -> LoadedModel:
    """Load ``model`` like ``load_model``, also from a quantized checkpoint, or quantizing on load.

    A Hugging Face directory whose ``config.json`` holds a compressed-tensors
    ``quantization_config`` loads into quantized layers (``dtype`` is then the dtype of
    activations and of the unquantized tensors). ``quantization`` (a preset name or a
    ``QuantConfig``) quantizes a 16-bit model after loading; it is refused for a checkpoint
    that is already quantized. ``weight_bytes`` counts the quantized parameters as stored.
    ``shard`` is ``load_model``'s tensor-parallel plan: a checkpoint's quantized layers are
    sharded before their weights are read; quantizing on load quantizes each loaded shard.
    """
    path = resolve_model_path(model)
    if is_artifact(path):
        raise ValueError(f"{path} is a compiled artifact: it loads through an engine (LLM, neuron-llm generate/serve)")
    checkpoint = read_quantization_config(path) if path.is_dir() else None
    if checkpoint is None:
        loaded = load_model(path, dtype=dtype, device=device, shard=shard)
        if quantization is not None:
            quantize_model(loaded.model, quantization)
            loaded.weight_bytes = loaded.model.weight_bytes()
        return loaded
    if quantization is not None:
        asked = quantization if isinstance(quantization, str) else quantization.scheme
        raise ValueError(f"{path} is already quantized (compressed-tensors): load it without quantization={asked!r}")
    info = load_model_info(path)
    with default_dtype(parse_dtype(dtype)), require_visible(device):
        built = LlamaForCausalLM(info.config)
        prepare_quantized_model(built, checkpoint)
        if shard is not None:
            shard(built)
    load_weights(built, adapt_checkpoint_weights(iter_hf_weights(path)))
    built.requires_grad_(False)
    return LoadedModel(**vars(info), model=built.eval(), weight_bytes=built.weight_bytes())

"""Turning a built model into a quantized one: swap ``Linear`` modules for quantized layers.

Two ways in, one layout out:

- ``quantize_model``: the model's 16-bit weights are loaded; each linear the policy selects is
  quantized and replaced (quantize on load). The 16-bit weight of a linear is freed as soon as
  its replacement exists, so the peak is the 16-bit model plus one quantized linear.
- ``prepare_quantized_model``: the model is freshly built and its checkpoint is quantized;
  each linear the checkpoint stores quantized is replaced by an empty quantized layer that
  ``load_weights`` then fills, so no 16-bit copy of those weights is ever made.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from neuron_llm.layers.linear import Linear
from neuron_llm.models.llama import LlamaForCausalLM
from neuron_llm.quant.checkpoint import CheckpointQuantization
from neuron_llm.quant.config import QuantConfig, resolve_quant_config
from neuron_llm.quant.layers import QuantizedLinear, empty_quantized_linear, quantize_linear, refuse_non_finite
from neuron_llm.quant.policy import LM_HEAD

EMBEDDING = "model.embed_tokens"


def quantize_model(model: LlamaForCausalLM, quantization: str | QuantConfig) -> list[str]:
    """Quantize, in place, the linears of the loaded ``model`` that the recipe selects.

    ``quantization`` is a ``QuantConfig`` or a preset name ("int8", "int8-head", "int8-g128",
    "fp8", "fp8-all", "w8a8"). Returns the names of the quantized modules. Raises ``ValueError``
    naming a module whose weight holds NaN or inf, before any module is replaced. Tensor-parallel
    shards are quantized from their own rows or columns (``neuron_llm.parallel.quantized``); a
    quantized LM head runs on one device only. Quantizing a tied LM head unties it.
    """
    from neuron_llm.parallel.quantized import quantize_parallel_linear

    config = resolve_quant_config(quantization)
    names = config.policy.select(model, model.config.num_hidden_layers)
    linears = {name: _plain_linear(model, name) for name in names}
    if LM_HEAD in linears and type(linears[LM_HEAD]) is not Linear:
        raise ValueError("a quantized lm_head runs on one device: the tensor-parallel head is not sharded in 8 bits")
    for name, linear in linears.items():
        refuse_non_finite(linear.weight, name)
    for name in names:
        # Popped, so each 16-bit weight is freed once its replacement is in place.
        linear = linears.pop(name)
        quantize = quantize_linear if type(linear) is Linear else quantize_parallel_linear
        _replace(model, name, quantize(linear, config.format, name))
    if LM_HEAD in names and model.config.tie_word_embeddings:
        # The embedding keeps the 16-bit table; the head now has its own quantized copy.
        model.config = dataclasses.replace(model.config, tie_word_embeddings=False)
    return names


def prepare_quantized_model(model: LlamaForCausalLM, checkpoint: CheckpointQuantization) -> list[str]:
    """Give the freshly built ``model`` the quantized layers ``checkpoint`` stores, before its weights load.

    Each replacement is created on the device of the linear it replaces. Returns the names of
    the replaced modules. An LM head tied to the embedding stays the embedding, as in vLLM: the
    quantized copy stored beside it is not read. Raises ``ValueError`` when the checkpoint
    quantizes the embedding, which no layer here reads quantized.
    """
    if checkpoint.format_of(EMBEDDING, module_class="Embedding") is not None:
        raise ValueError(
            f"the checkpoint quantizes the embedding ({EMBEDDING}), which is not implemented: only linears "
            "load quantized; quantize it again with the embedding left out of the targets"
        )
    names = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, Linear):
            continue
        fmt = checkpoint.format_of(name)
        if fmt is None or (name == LM_HEAD and model.config.tie_word_embeddings):
            continue
        linear = _plain_linear(model, name)
        with torch.device(linear.weight.device):
            _replace(
                model,
                name,
                empty_quantized_linear(fmt, linear.in_features, linear.out_features, linear.bias is not None),
            )
        names.append(name)
    return names


@dataclass(frozen=True)
class QuantizedBytes:
    """Bytes of the quantized linears' weights and scales, against the same weights in 16-bit."""

    quantized: int
    sixteen_bit: int

    @property
    def ratio(self) -> float:
        return self.quantized / self.sixteen_bit if self.sixteen_bit else 1.0


def quantized_weight_bytes(model: nn.Module) -> QuantizedBytes:
    """Weight and scale bytes of ``model``'s quantized linears, and what 16-bit weights would take."""
    quantized = sixteen_bit = 0
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            quantized += sum(p.numel() * p.element_size() for p in (module.weight, module.weight_scale))
            sixteen_bit += module.weight.numel() * 2
    return QuantizedBytes(quantized, sixteen_bit)


def _plain_linear(model: nn.Module, name: str) -> Linear:
    module = model.get_submodule(name)
    if isinstance(module, QuantizedLinear):
        raise ValueError(f"{name} is already quantized ({module.format.scheme})")
    if not isinstance(module, Linear):
        raise ValueError(f"{name} is a {type(module).__name__}, not a linear layer")
    return module


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name), leaf, new)

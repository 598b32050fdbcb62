"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights before W8A8 int8.

A few input channels of a linear carry activations tens of times larger than the rest; with
one int8 scale per token, they leave the other channels a handful of levels. For positive
per-channel factors ``s``, ``x @ W.T == (x / s) @ (W * s).T``: dividing channel ``j`` of the
activations by ``s_j`` and multiplying column ``j`` of the weight by it changes nothing in
exact arithmetic, and with ``s_j = max|x_j| ** alpha / max|W[:, j]| ** (1 - alpha)`` it
shares the range between the two, so both quantize well. The division is folded into what
produces ``x``, so it costs nothing at run time: the two norm mappings of llm-compressor's
SmoothQuant defaults for Llama, and the up_proj one that AWQ also uses:

    q_proj, k_proj, v_proj  <-  input_layernorm.weight
    gate_proj, up_proj      <-  post_attention_layernorm.weight
    down_proj               <-  up_proj's output rows (silu(gate) * up is linear in up)

``o_proj`` is left alone: its input comes from attention, whose value heads are shared
across query heads under GQA, so no single row scaling of ``v_proj`` reaches it cleanly.

The activation maxima ``max|x_j|`` come from running the unquantized model on calibration
text (``activation_maxima``); ``smooth_model`` then rescales the weights in place, after
which any W8A8 quantization applies (``QuantConfig.for_scheme("w8a8")``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from neuron_llm.eval.perplexity import KV_BLOCK_SIZE, forward_sequence, sequence_kv_caches
from neuron_llm.layers.linear import Linear
from neuron_llm.models.llama import LlamaForCausalLM

DEFAULT_ALPHA = 0.5
"""Migration strength: 0 leaves activations as they are, 1 moves all their range into the weights."""
_MIN_MAX = 1e-5
"""Channels whose activation or weight maximum is below this are left unscaled (s = 1)."""


@dataclass(frozen=True)
class SmoothGroup:
    """Linears reading the same input, and the module whose weight produces that input."""

    producer: str
    """An RMSNorm (its ``weight`` scales channels) or a linear (its output rows are the channels)."""
    linears: tuple[str, ...]


def smooth_groups(model: LlamaForCausalLM) -> list[SmoothGroup]:
    """The smoothable groups of every decoder layer, in the order they are smoothed.

    up_proj -> down_proj comes before the norm -> gate/up group: it rescales up_proj's rows,
    which the gate/up group's weight maxima must already include.
    """
    groups = []
    for i in range(model.config.num_hidden_layers):
        attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        groups += [
            SmoothGroup(f"model.layers.{i}.input_layernorm", (f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj")),
            SmoothGroup(f"{mlp}.up_proj", (f"{mlp}.down_proj",)),
            SmoothGroup(f"model.layers.{i}.post_attention_layernorm", (f"{mlp}.gate_proj", f"{mlp}.up_proj")),
        ]
    return groups


@torch.inference_mode()
def activation_maxima(model: LlamaForCausalLM, sequences: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-channel absolute maxima of each smooth group's input over ``sequences``.

    ``sequences`` are 1-D token id tensors, each run as one prompt. Returns float32 [in_features]
    per group, keyed by the group's first linear.
    """
    groups = smooth_groups(model)
    maxima: dict[str, torch.Tensor] = {}

    def record(name: str) -> object:
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach()
            amax = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
            maxima[name] = amax if name not in maxima else torch.maximum(maxima[name], amax)

        return hook

    handles = [
        model.get_submodule(group.linears[0]).register_forward_pre_hook(record(group.linears[0])) for group in groups
    ]
    device = model.model.embed_tokens.weight.device
    kv_caches: list | None = None
    capacity = 0
    try:
        for sequence in sequences:
            if kv_caches is None or sequence.shape[0] > capacity:
                capacity = sequence.shape[0]
                kv_caches = sequence_kv_caches(model, capacity)
            forward_sequence(model, sequence.to(device), kv_caches, KV_BLOCK_SIZE)
    finally:
        for handle in handles:
            handle.remove()
    if not maxima:
        raise ValueError("no calibration sequence was given")
    return maxima


@torch.inference_mode()
def smooth_model(model: LlamaForCausalLM, maxima: dict[str, torch.Tensor], alpha: float = DEFAULT_ALPHA) -> None:
    """Rescale ``model``'s smooth groups in place with the activation ``maxima`` of ``activation_maxima``.

    The model computes the same function afterwards, up to rounding. Raises ``ValueError`` for
    ``alpha`` outside [0, 1], a missing group, or a linear already quantized.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha}: the migration strength must be in [0, 1]")
    for group in smooth_groups(model):
        linears = [model.get_submodule(name) for name in group.linears]
        for name, linear in zip(group.linears, linears, strict=True):
            if type(linear) is not Linear:
                raise ValueError(f"{name} is a {type(linear).__name__}: smooth a model before quantizing it")
        x_max = maxima.get(group.linears[0])
        if x_max is None:
            raise ValueError(f"no activation maxima for {group.linears[0]}: calibrate this model first")
        w_max = torch.stack([linear.weight.abs().amax(dim=0).float() for linear in linears]).amax(dim=0)
        x_max = x_max.to(w_max.device)
        scale = x_max.pow(alpha) / w_max.pow(1.0 - alpha)
        # Channels never seen active, or with all-zero weights, carry no information for s.
        scale = torch.where((x_max > _MIN_MAX) & (w_max > _MIN_MAX), scale, torch.ones_like(scale))
        producer = model.get_submodule(group.producer)
        if isinstance(producer, Linear):  # its output rows are the channels
            producer.weight.div_(scale[:, None].to(producer.weight.dtype))
            if producer.bias is not None:
                producer.bias.div_(scale.to(producer.bias.dtype))
        else:
            producer.weight.div_(scale.to(producer.weight.dtype))
        for linear in linears:
            linear.weight.mul_(scale[None, :].to(linear.weight.dtype))


def calibration_sequences(token_ids: list[int], num_tokens: int, length: int) -> list[torch.Tensor]:
    """Up to ``num_tokens`` of ``token_ids`` cut into consecutive sequences of ``length`` tokens.

    A shorter text gives fewer sequences (the last one may be short); an empty one raises.
    """
    if length < 1 or num_tokens < 1:
        raise ValueError(f"calibration length={length} and tokens={num_tokens} must be positive")
    ids = token_ids[:num_tokens]
    if not ids:
        raise ValueError("the calibration text has no tokens")
    return [torch.tensor(ids[i : i + length]) for i in range(0, len(ids), length)]

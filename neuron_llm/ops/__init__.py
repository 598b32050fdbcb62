"""Operations whose best form depends on the hardware, dispatched to the active backend.

Model code calls these functions and never asks which backend runs them. The engine picks
the backend once with ``use_backend``; the ``torch`` reference is active by default.
"""

from __future__ import annotations

import torch

from neuron_llm.backends import Backend, get_backend
from neuron_llm.ops.metadata import NULL_BLOCK_ID, AttentionMetadata

_active: Backend = get_backend("torch")


def use_backend(backend: Backend | str) -> Backend:
    """Make ``backend`` (an instance or a name) the one every op dispatches to; returns it."""
    global _active
    _active = get_backend(backend) if isinstance(backend, str) else backend
    return _active


def active_backend() -> Backend:
    return _active


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    _active.write_kv_cache(key, value, key_cache, value_cache, slot_mapping)


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    return _active.paged_attention(query, key_cache, value_cache, metadata, scale)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    return _active.argmax(logits)


def sample_argmax(logits: torch.Tensor, noise: torch.Tensor, is_greedy: torch.Tensor) -> torch.Tensor:
    return _active.sample_argmax(logits, noise, is_greedy)


def top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None, top_k_bound: int | None = None
) -> torch.Tensor:
    return _active.top_k_top_p(logits, top_k, top_p, top_k_bound)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return _active.linear(x, weight, bias)


def int8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    group_size: int | None = None,
) -> torch.Tensor:
    return _active.int8_linear(x, weight, weight_scale, bias, group_size)


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation_scale_ub: float | None = None,
) -> torch.Tensor:
    return _active.fp8_linear(x, weight, weight_scale, bias, activation_scale_ub)


def w8a8_linear(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    return _active.w8a8_linear(x, weight, weight_scale, bias)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    return _active.rms_norm(x, weight, eps, residual)


def norm_linear(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None, linear: torch.nn.Module
) -> tuple[torch.Tensor, torch.Tensor]:
    return _active.norm_linear(x, weight, eps, residual, linear)


def feed_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None,
    gate_up_proj: torch.nn.Module,
    down_proj: torch.nn.Module,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _active.feed_forward(x, weight, eps, residual, gate_up_proj, down_proj)


def rotary_write_kv(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    return _active.rotary_write_kv(query, key, value, cos, sin, key_cache, value_cache, slot_mapping)


__all__ = [
    "NULL_BLOCK_ID",
    "AttentionMetadata",
    "active_backend",
    "feed_forward",
    "fp8_linear",
    "int8_linear",
    "linear",
    "norm_linear",
    "paged_attention",
    "rms_norm",
    "rotary_write_kv",
    "use_backend",
    "w8a8_linear",
    "write_kv_cache",
]

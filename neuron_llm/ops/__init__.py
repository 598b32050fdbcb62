"""Operations whose best form depends on the hardware, dispatched to the active backend.

Model code calls these functions and never asks which backend runs them. A worker runs its
steps inside ``using_backend(its backend)``, so two engines of one process (one on the GPU,
one on the CPU) each keep their own; outside such a block the backend of
``use_backend`` is active, the ``torch`` reference by default.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from neuron_llm.backends import Backend, get_backend
from neuron_llm.ops.metadata import NULL_BLOCK_ID, AttentionMetadata

_default: Backend = get_backend("torch")
_scoped = threading.local()


def use_backend(backend: Backend | str) -> Backend:
    """Make ``backend`` (an instance or a name) the process's default; returns it."""
    global _default
    _default = get_backend(backend) if isinstance(backend, str) else backend
    return _default


@contextmanager
def using_backend(backend: Backend) -> Iterator[Backend]:
    """Dispatch this thread's ops to ``backend`` inside the block, then to the one active before."""
    previous = getattr(_scoped, "backend", None)
    _scoped.backend = backend
    try:
        yield backend
    finally:
        _scoped.backend = previous


def active_backend() -> Backend:
    return getattr(_scoped, "backend", None) or _default


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    active_backend().write_kv_cache(key, value, key_cache, value_cache, slot_mapping)


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    return active_backend().paged_attention(query, key_cache, value_cache, metadata, scale)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    return active_backend().argmax(logits)


def sample_argmax(logits: torch.Tensor, noise: torch.Tensor, is_greedy: torch.Tensor) -> torch.Tensor:
    return active_backend().sample_argmax(logits, noise, is_greedy)


def top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None, top_k_bound: int | None = None
) -> torch.Tensor:
    return active_backend().top_k_top_p(logits, top_k, top_p, top_k_bound)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return active_backend().linear(x, weight, bias)


def int8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    group_size: int | None = None,
) -> torch.Tensor:
    return active_backend().int8_linear(x, weight, weight_scale, bias, group_size)


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation_scale_ub: float | None = None,
) -> torch.Tensor:
    return active_backend().fp8_linear(x, weight, weight_scale, bias, activation_scale_ub)


def w8a8_linear(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    return active_backend().w8a8_linear(x, weight, weight_scale, bias)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    return active_backend().rms_norm(x, weight, eps, residual)


def norm_linear(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None, linear: torch.nn.Module
) -> tuple[torch.Tensor, torch.Tensor]:
    return active_backend().norm_linear(x, weight, eps, residual, linear)


def linear_residual(
    x: torch.Tensor, linear: torch.nn.Module, residual: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    return active_backend().linear_residual(x, linear, residual)


def norm_qkv_rotary(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None,
    qkv_proj: torch.nn.Module,
    qkv_sizes: Sequence[int],
    head_dim: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    return active_backend().norm_qkv_rotary(
        x, weight, eps, residual, qkv_proj, qkv_sizes, head_dim, cos, sin, key_cache, value_cache, slot_mapping
    )


def feed_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None,
    gate_up_proj: torch.nn.Module,
    down_proj: torch.nn.Module,
) -> tuple[torch.Tensor, torch.Tensor]:
    return active_backend().feed_forward(x, weight, eps, residual, gate_up_proj, down_proj)


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
    return active_backend().rotary_write_kv(query, key, value, cos, sin, key_cache, value_cache, slot_mapping)


__all__ = [
    "NULL_BLOCK_ID",
    "AttentionMetadata",
    "active_backend",
    "feed_forward",
    "fp8_linear",
    "int8_linear",
    "linear_residual",
    "linear",
    "norm_linear",
    "norm_qkv_rotary",
    "paged_attention",
    "rms_norm",
    "rotary_write_kv",
    "use_backend",
    "using_backend",
    "w8a8_linear",
    "write_kv_cache",
]

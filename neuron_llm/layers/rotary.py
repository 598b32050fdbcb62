"""Rotary position embeddings (RoPE, Su et al. 2021), with the linear, Llama 3.1 and YaRN frequency scalings."""

from __future__ import annotations

import math

import torch
from torch import nn

from neuron_llm.config import LinearRopeScaling, Llama3RopeScaling, RopeScaling, YarnRopeScaling


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """[head_dim // 2] fp32 inverse frequencies, stretched by ``scaling`` when it is set."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    if isinstance(scaling, LinearRopeScaling):
        return inv_freq / scaling.factor
    if isinstance(scaling, YarnRopeScaling):
        return _yarn(inv_freq, head_dim, theta, scaling)
    return _llama3(inv_freq, scaling)


def _llama3(inv_freq: torch.Tensor, scaling: Llama3RopeScaling) -> torch.Tensor:
    # Long wavelengths are divided by `factor`, short ones kept, the band between
    # interpolated smoothly.
    context = scaling.original_max_position_embeddings
    low_freq_wavelen = context / scaling.low_freq_factor
    high_freq_wavelen = context / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (context / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn(inv_freq: torch.Tensor, head_dim: int, theta: float, scaling: YarnRopeScaling) -> torch.Tensor:
    # Frequencies turning fewer than beta_slow times over the original context are divided by
    # `factor` (interpolated), those turning more than beta_fast times kept, a ramp between.
    def dimension(num_rotations: float) -> float:
        # The pair index whose frequency turns num_rotations times over the original context.
        context = scaling.original_max_position_embeddings
        return head_dim * math.log(context / (num_rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dimension(scaling.beta_fast), dimension(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    # Computed in transformers' order, so that the frequencies match transformers' to the bit.
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    kept = 1 - ramp
    pos_freqs = theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    return 1.0 / (scaling.factor * pos_freqs) * (1 - kept) + inv_freq * kept


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RotaryEmbedding(nn.Module):
    """Computes cos/sin for the given positions on the fly: no table sized by the max length."""

    def __init__(self, head_dim: int, theta: float, scaling: RopeScaling | None) -> None:
        super().__init__()
        self.register_buffer("inv_freq", inverse_frequencies(head_dim, theta, scaling), persistent=False)
        self.attention_factor = 1.0 if scaling is None else scaling.attention_factor

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Return cos, sin: [num_tokens, 1, head_dim] in ``dtype`` for ``positions`` [num_tokens]."""
        freqs = positions[:, None].float() * self.inv_freq[None, :]  # [num_tokens, head_dim // 2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        if self.attention_factor == 1.0:
            return emb.cos().to(dtype), emb.sin().to(dtype)
        return (emb.cos() * self.attention_factor).to(dtype), (emb.sin() * self.attention_factor).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [num_tokens, num_heads, head_dim] by the angles whose cos/sin are given."""
    return x * cos + rotate_half(x) * sin

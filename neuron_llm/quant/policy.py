"""Which linears of a Llama get quantized.

A policy names linears within a decoder layer (``q_proj`` ... ``down_proj``) and decoder
layers to leave alone. The embedding is never quantized: it is a lookup, not a matmul. The LM
head is left 16-bit unless a policy opts in (``lm_head=True``): it is where small errors
change the argmax most directly, but at batch 1 it is a large share of the bytes a decode
step reads (1.05 of 9.09 GB for Llama-3-8B in int8), so an int8 head is the next saving.

The Llama 3 fp8 recipe (Dubey et al. 2024, sec. 6.2) quantizes the feed-forward linears only,
and keeps the first and last decoder layers in 16-bit: attention and the layers next to the
embedding and the head were where fp8 cost quality.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
FEED_FORWARD_LINEARS = ("gate_proj", "up_proj", "down_proj")
DECODER_LINEARS = ATTENTION_LINEARS + FEED_FORWARD_LINEARS
LM_HEAD = "lm_head"
_DECODER_LINEAR_NAME = re.compile(r"model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)")


@dataclass(frozen=True)
class QuantPolicy:
    """The decoder linears to quantize: those named in ``modules``, outside ``skip_layers``."""

    modules: tuple[str, ...] = DECODER_LINEARS
    """Linear names within a decoder layer, among q/k/v/o_proj and gate/up/down_proj."""
    skip_layers: tuple[int, ...] = ()
    """Decoder layers kept in 16-bit; negative indices count from the end (-1 is the last)."""
    lm_head: bool = False
    """Quantize the LM head too. A head tied to the embedding is untied: the embedding keeps
    its 16-bit table and the head gets its own quantized copy."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.modules) - set(DECODER_LINEARS))
        if unknown or not self.modules:
            raise ValueError(f"modules={self.modules!r}: must be a non-empty subset of {', '.join(DECODER_LINEARS)}")
        if not all(isinstance(i, int) for i in self.skip_layers):
            raise ValueError(f"skip_layers={self.skip_layers!r}: must be integers")
        if not isinstance(self.lm_head, bool):
            raise ValueError(f"lm_head={self.lm_head!r}: must be a bool")

    def skipped(self, num_layers: int) -> set[int]:
        """The skipped layer indices of a model with ``num_layers`` decoder layers."""
        out_of_range = [i for i in self.skip_layers if not -num_layers <= i < num_layers]
        if out_of_range:
            raise ValueError(f"skip_layers={self.skip_layers!r}: {out_of_range} out of range for {num_layers} layers")
        return {i % num_layers for i in self.skip_layers}

    def select(self, model: nn.Module, num_layers: int) -> list[str]:
        """Names of the modules of ``model`` this policy quantizes, in module order; at least one."""
        skipped = self.skipped(num_layers)
        selected = []
        for name, _ in model.named_modules():
            match = _DECODER_LINEAR_NAME.fullmatch(name)
            if match and match[2] in self.modules and int(match[1]) not in skipped:
                selected.append(name)
        if self.lm_head:
            selected.append(LM_HEAD)
        if not selected:
            # Quantizing nothing would serve the 16-bit model under a quantized name.
            raise ValueError(
                f"the quantization policy selects no linear of this {num_layers}-layer model: it keeps layers "
                f"{sorted(skipped)} in 16-bit and quantizes only {', '.join(self.modules)}"
            )
        return selected


ALL_LINEARS = QuantPolicy()
"""Every linear of every decoder layer."""
LLAMA3_FP8 = QuantPolicy(modules=FEED_FORWARD_LINEARS, skip_layers=(0, -1))
"""Feed-forward linears only, first and last decoder layers in 16-bit."""
ALL_LINEARS_AND_HEAD = QuantPolicy(lm_head=True)
"""Every linear of every decoder layer, and the LM head."""

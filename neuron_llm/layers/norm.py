from __future__ import annotations

import torch
from torch import nn

from neuron_llm import ops


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, reduced in fp32 and scaled in the input dtype (as Llama does).

    Given ``residual``, it first adds it to ``x`` and also returns the sum (the next residual),
    so that a backend can fuse the add into the norm.
    """

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        normed, residual_out = ops.rms_norm(x, self.weight, self.eps, residual)
        return normed if residual is None else (normed, residual_out)

from __future__ import annotations

import torch
from torch import nn

from neuron_llm import ops


class Linear(nn.Module):
    """A dense linear layer whose matmul goes through ``neuron_llm.ops`` (so a backend can own it).

    The weight is [out_features, in_features], as in ``torch.nn.Linear`` and checkpoints.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

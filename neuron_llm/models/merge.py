"""Merging the projections that read the same input into one matmul: Q/K/V and gate/up.

One matmul over the concatenated weight reads the input once and launches once; at batch 1
a decode step is a chain of matrix-vector products whose small ones (K and V) run far from
the memory bandwidth. Applied to a loaded model (after sharding and quantization), so
checkpoints, sharding plans and quantization policies keep the per-projection names.

Column-parallel shards merge like whole linears: their forward needs no communication, so
the concatenation of this rank's blocks is this rank's block of the merged output. Linears
of different formats (a policy quantizing only some of them) are left unmerged.
"""

from __future__ import annotations

import torch
from torch import nn

from neuron_llm.layers.linear import Linear
from neuron_llm.models.llama import LlamaForCausalLM
from neuron_llm.parallel.layers import RowParallelLinear
from neuron_llm.quant.layers import QuantizedLinear, empty_quantized_linear


def merge_projections(model: LlamaForCausalLM) -> int:
    """Give every layer a ``qkv_proj`` and a ``gate_up_proj`` where its projections can merge.

    The merged weight holds the parts in order (Q, K, V; gate, up) along its output rows; the
    part modules are dropped. Returns the number of merged modules.
    """
    merged = 0
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        parts = [attention.q_proj, attention.k_proj, attention.v_proj]
        if attention.qkv_proj is None and (qkv := _merged(parts)):
            attention.qkv_proj = qkv
            attention.qkv_sizes = [part.out_features for part in parts]
            attention.q_proj = attention.k_proj = attention.v_proj = None
            merged += 1
        if mlp.gate_up_proj is None and (gate_up := _merged([mlp.gate_proj, mlp.up_proj])):
            mlp.gate_up_proj = gate_up
            mlp.gate_proj = mlp.up_proj = None
            merged += 1
    return merged


def _merged(parts: list[nn.Module]) -> nn.Module | None:
    """One linear computing ``parts`` side by side, or None when they differ in kind or format."""
    kinds = {_kind(part) for part in parts}
    if len(kinds) != 1 or None in kinds:
        return None
    if len({part.bias is None for part in parts}) != 1:
        return None
    first = parts[0]
    in_features = first.in_features
    out_features = sum(part.out_features for part in parts)
    has_bias = first.bias is not None
    weight = first.weight
    with torch.device(weight.device):
        if isinstance(first, QuantizedLinear):
            merged = empty_quantized_linear(first.format, in_features, out_features, has_bias)
            merged.weight_scale.data.copy_(torch.cat([part.weight_scale for part in parts]))
        else:
            merged = Linear(in_features, out_features, has_bias).to(weight.dtype)
    merged.weight.data.copy_(torch.cat([part.weight for part in parts]))
    if has_bias:
        merged.bias.data.copy_(torch.cat([part.bias for part in parts]))
    return merged.requires_grad_(False)


def _kind(part: nn.Module) -> object:
    """What must agree for linears to merge: the class family and the weight format."""
    if isinstance(part, QuantizedLinear):
        return part.format
    if isinstance(part, Linear) and not isinstance(part, RowParallelLinear):
        return part.weight.dtype
    return None

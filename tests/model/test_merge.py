"""Merged Q/K/V and gate/up projections compute what the separate ones do, in every weight format."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from neuron_llm.loader import load_model
from neuron_llm.models.merge import merge_projections
from neuron_llm.quant import QuantConfig, QuantPolicy, quantize_model
from neuron_llm.quant.layers import QuantizedLinear


@pytest.mark.parametrize("quantization", [None, "int8", "int8-g128", "fp8-all", "w8a8"])
def test_merged_model_gives_the_same_logits(
    save_tiny_llama: Callable[..., tuple[Any, Path]], paged_runner: Any, quantization: str | None
) -> None:
    _, path = save_tiny_llama(hidden_size=128, intermediate_size=256, num_attention_heads=4)
    model = load_model(path, dtype=torch.float32, device="cpu").model
    if quantization:
        quantize_model(model, quantization)
    merged = copy.deepcopy(model)
    assert merge_projections(merged) == 2 * model.config.num_hidden_layers
    for layer in merged.model.layers:
        assert layer.self_attn.q_proj is None and layer.mlp.gate_proj is None
        assert layer.self_attn.qkv_sizes == [128, 64, 64]
        assert layer.self_attn.qkv_proj.weight.dtype == model.model.layers[0].self_attn.q_proj.weight.dtype
    if quantization:
        gate_up = merged.model.layers[0].mlp.gate_up_proj
        assert isinstance(gate_up, QuantizedLinear)
        assert gate_up.format == model.model.layers[0].mlp.gate_proj.format
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8]]
    for expected, actual in zip(paged_runner(model).logits(prompts), paged_runner(merged).logits(prompts)):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert merge_projections(merged) == 0  # already merged


def test_linears_of_different_formats_stay_apart(save_tiny_llama: Callable[..., tuple[Any, Path]]) -> None:
    _, path = save_tiny_llama(hidden_size=128, intermediate_size=256, num_attention_heads=4)
    model = load_model(path, dtype=torch.float32, device="cpu").model
    only_q_and_gate = QuantPolicy(modules=("q_proj", "gate_proj"))
    quantize_model(model, QuantConfig.for_scheme("int8", policy=only_q_and_gate))
    assert merge_projections(model) == 0
    assert model.model.layers[0].self_attn.qkv_proj is None and model.model.layers[0].mlp.gate_up_proj is None

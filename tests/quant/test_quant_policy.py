"""The skip policy: exactly the linears a recipe names are quantized, and nothing else."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from neuron_llm.layers.linear import Linear
from neuron_llm.quant import LinearFormat, QuantConfig, QuantPolicy, quantize_model, quantized_linears
from neuron_llm.quant.layers import Fp8Linear, Int8Linear
from neuron_llm.quant.policy import DECODER_LINEARS


def layer_linears(layer: int, names: tuple[str, ...]) -> list[str]:
    blocks = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn"}
    return [f"model.layers.{layer}.{blocks.get(name, 'mlp')}.{name}" for name in names]


def test_int8_default_quantizes_every_decoder_linear(quant_checkpoint: tuple[Any, Path], load_fp32: Callable) -> None:
    model = load_fp32(quant_checkpoint[1]).model
    names = quantize_model(model, "int8")
    expected = [name for layer in range(4) for name in layer_linears(layer, DECODER_LINEARS)]
    assert names == expected
    assert quantized_linears(model) == {name: LinearFormat("int8") for name in expected}
    assert type(model.lm_head) is Linear


def test_fp8_default_is_the_llama3_recipe(quant_checkpoint: tuple[Any, Path], load_fp32: Callable) -> None:
    model = load_fp32(quant_checkpoint[1]).model
    quantize_model(model, "fp8")
    feed_forward = ("gate_proj", "up_proj", "down_proj")
    expected = layer_linears(1, feed_forward) + layer_linears(2, feed_forward)
    assert quantized_linears(model) == {name: LinearFormat("fp8", activation_scale_ub=1200.0) for name in expected}
    for name, module in model.named_modules():
        if name in expected:
            assert isinstance(module, Fp8Linear)
        elif name.endswith("_proj") or name == "lm_head":
            assert type(module) is Linear, f"{name} should have stayed 16-bit"


def test_policy_is_configurable(quant_checkpoint: tuple[Any, Path], load_fp32: Callable) -> None:
    model = load_fp32(quant_checkpoint[1]).model
    policy = QuantPolicy(modules=("q_proj", "down_proj"), skip_layers=(-2,))
    quantize_model(model, QuantConfig.for_scheme("int8", group_size=64, policy=policy))
    expected = [name for layer in (0, 1, 3) for name in layer_linears(layer, ("q_proj", "down_proj"))]
    assert list(quantized_linears(model)) == expected
    assert all(isinstance(model.get_submodule(name), Int8Linear) for name in expected)
    assert model.get_submodule(expected[0]).weight_scale.shape == (128, 2)


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ({"modules": ("lm_head",)}, "subset of q_proj"),
        ({"modules": ()}, "non-empty subset"),
        ({"skip_layers": (4,)}, r"\[4\] out of range for 4 layers"),
        ({"skip_layers": (-5,)}, r"\[-5\] out of range"),
    ],
)
def test_bad_policies_are_refused(
    quant_checkpoint: tuple[Any, Path], load_fp32: Callable, policy: dict, message: str
) -> None:
    model = load_fp32(quant_checkpoint[1]).model
    with pytest.raises(ValueError, match=message):
        quantize_model(model, QuantConfig.for_scheme("int8", policy=QuantPolicy(**policy)))


def test_unknown_preset_is_refused(quant_checkpoint: tuple[Any, Path], load_fp32: Callable) -> None:
    model = load_fp32(quant_checkpoint[1]).model
    with pytest.raises(ValueError, match="quantization='int4': must be one of int8, int8-g128, fp8, fp8-all"):
        quantize_model(model, "int4")

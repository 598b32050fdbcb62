"""The skip policy: exactly the linears a recipe names are quantized, and nothing else."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from neuron_llm.layers.linear import Linear
from neuron_llm.parallel.layers import ParallelLMHead, Partition
from neuron_llm.quant import LinearFormat, QuantConfig, QuantPolicy, quantize_model, quantized_linears
from neuron_llm.quant.layers import Fp8Linear, Int8Linear
from neuron_llm.quant.policy import DECODER_LINEARS
from tests.quant.conftest import QUANT_LLAMA


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


def test_a_recipe_that_selects_no_linear_is_refused(quant_checkpoint: tuple[Any, Path], load_fp32: Callable) -> None:
    """The fp8 recipe keeps the first and last layers in 16-bit: on two layers it would quantize nothing."""
    model = load_fp32(quant_checkpoint[1]).model
    everything_skipped = QuantPolicy(modules=("gate_proj",), skip_layers=(0, 1, 2, 3))
    with pytest.raises(ValueError, match=r"selects no linear of this 4-layer model: it keeps layers \[0, 1, 2, 3\]"):
        quantize_model(model, QuantConfig.for_scheme("fp8", policy=everything_skipped))
    assert quantized_linears(model) == {}


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
    with pytest.raises(ValueError, match="quantization='int4': must be one of int8, int8-head, int8-g128, fp8"):
        quantize_model(model, "int4")


@pytest.mark.parametrize("tied", [False, True])
def test_an_opted_in_lm_head_is_quantized_and_untied(
    save_tiny_llama: Callable[..., tuple[Any, Path]], load_fp32: Callable, paged_runner: type, tied: bool
) -> None:
    path = save_tiny_llama(**QUANT_LLAMA, tie_word_embeddings=tied)[1]
    reference, model = load_fp32(path).model, load_fp32(path).model
    embedding = model.model.embed_tokens.weight.clone()
    names = quantize_model(model, "int8-head")
    assert names[-1] == "lm_head" and len(names) == 4 * len(DECODER_LINEARS) + 1
    assert isinstance(model.lm_head, Int8Linear)
    # The embedding keeps its 16-bit table; a tied head got its own int8 copy of it.
    assert torch.equal(model.model.embed_tokens.weight, embedding) and model.config.tie_word_embeddings is False
    prompt = list(range(0, 240, 7))
    [expected] = paged_runner(reference).logits([prompt])
    [actual] = paged_runner(model).logits([prompt])
    quantize_model(reference, "int8")
    [head_16bit] = paged_runner(reference).logits([prompt])
    # Per-channel int8 on every linear, the head included, stays close to the float32 logits;
    # the head's own rounding shows beside the same model with a float32 head.
    assert (actual - expected).norm() / expected.norm() < 0.02
    assert 0 < (actual - head_16bit).norm() / expected.norm() < 0.01
    assert actual.argmax(-1).eq(expected.argmax(-1)).float().mean() > 0.9


def test_a_tensor_parallel_lm_head_is_not_quantized(quant_checkpoint: tuple[Any, Path], load_fp32: Callable) -> None:
    model = load_fp32(quant_checkpoint[1]).model
    head = model.lm_head
    model.lm_head = ParallelLMHead(head.in_features, head.out_features, Partition(0, 1))
    with pytest.raises(ValueError, match="a quantized lm_head runs on one device"):
        quantize_model(model, "int8-head")
    assert quantized_linears(model) == {}

"""SmoothQuant: calibration maxima, a function-preserving rescale, and less W8A8 error where outliers are."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from neuron_llm.models.llama import LlamaForCausalLM
from neuron_llm.quant import quantize_model
from neuron_llm.quant.smoothquant import activation_maxima, calibration_sequences, smooth_groups, smooth_model

OUTLIER_FACTOR = 40.0


def with_outlier_channels(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """``model`` with a few input channels of every smoothed linear 40x larger, as trained LLMs have."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[[5, 17]] *= OUTLIER_FACTOR
            layer.post_attention_layernorm.weight[3] *= OUTLIER_FACTOR
            layer.mlp.up_proj.weight[9] *= OUTLIER_FACTOR
    return model


def calibration(seed: int = 3) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 250, (32,), generator=generator) for _ in range(4)]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.fixture
def outlier_model(quant_checkpoint: tuple[Any, Path], load_fp32: Callable) -> LlamaForCausalLM:
    return with_outlier_channels(load_fp32(quant_checkpoint[1]).model)


def test_maxima_of_the_first_layer_equal_a_direct_computation(outlier_model: LlamaForCausalLM) -> None:
    sequences = calibration()
    maxima = activation_maxima(outlier_model, sequences)
    assert set(maxima) == {group.linears[0] for group in smooth_groups(outlier_model)}
    # Layer 0's attention input is the RMS-normed embedding.
    x = outlier_model.model.embed_tokens.weight[torch.cat(sequences)]
    eps = outlier_model.config.rms_norm_eps
    normed = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
    expected = (normed * outlier_model.model.layers[0].input_layernorm.weight).abs().amax(dim=0)
    torch.testing.assert_close(maxima["model.layers.0.self_attn.q_proj"], expected, rtol=1e-5, atol=1e-6)


def test_smoothing_keeps_the_function_and_flattens_the_outliers(
    outlier_model: LlamaForCausalLM, paged_runner: type, prompt: list[int]
) -> None:
    [expected] = paged_runner(outlier_model).logits([prompt])
    before = activation_maxima(outlier_model, calibration())
    smoothed = copy.deepcopy(outlier_model)
    smooth_model(smoothed, before, alpha=0.5)
    [actual] = paged_runner(smoothed).logits([prompt])
    assert relative_error(actual, expected) < 1e-5
    after = activation_maxima(smoothed, calibration())
    for name in before:
        # Outlier channels stand out of the median channel far less once smoothed.
        spread_before = (before[name].max() / before[name].median()).item()
        spread_after = (after[name].max() / after[name].median()).item()
        assert spread_after < spread_before / 3, (name, spread_before, spread_after)


def test_smoothing_cuts_the_w8a8_error_on_outlier_channels(
    outlier_model: LlamaForCausalLM, paged_runner: type, prompt: list[int]
) -> None:
    [expected] = paged_runner(outlier_model).logits([prompt])
    plain = copy.deepcopy(outlier_model)
    quantize_model(plain, "w8a8")
    smoothed = copy.deepcopy(outlier_model)
    smooth_model(smoothed, activation_maxima(smoothed, calibration()), alpha=0.5)
    quantize_model(smoothed, "w8a8")
    [plain_logits] = paged_runner(plain).logits([prompt])
    [smoothed_logits] = paged_runner(smoothed).logits([prompt])
    # Measured: 10.9% unsmoothed, 3.6% smoothed.
    assert relative_error(smoothed_logits, expected) < relative_error(plain_logits, expected) / 2


def test_alpha_one_moves_all_range_into_the_weights_and_zero_none(outlier_model: LlamaForCausalLM) -> None:
    sequences = calibration()
    maxima = activation_maxima(outlier_model, sequences)
    # alpha 1: s = max|x|, so on the calibration text every input channel peaks at exactly 1.
    all_in = copy.deepcopy(outlier_model)
    smooth_model(all_in, maxima, alpha=1.0)
    for name, amax in activation_maxima(all_in, sequences).items():
        torch.testing.assert_close(amax, torch.ones_like(amax), rtol=1e-4, atol=0, msg=name)
    # alpha 0: s = 1 / max|W|, so every input column of each group's weights peaks at 1.
    none_in = copy.deepcopy(outlier_model)
    smooth_model(none_in, maxima, alpha=0.0)
    for group in smooth_groups(none_in):
        weights = torch.cat([none_in.get_submodule(name).weight for name in group.linears])
        column_max = weights.abs().amax(dim=0)
        torch.testing.assert_close(column_max, torch.ones_like(column_max), rtol=1e-5, atol=0)


def test_a_channel_no_weight_reads_is_left_alone(
    outlier_model: LlamaForCausalLM, paged_runner: type, prompt: list[int]
) -> None:
    """A zero weight column gives a zero smoothing scale for its channel; dividing by it would
    put NaN in the norm."""
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj"):
            getattr(outlier_model.model.layers[0].self_attn, name).weight[:, 7] = 0
    [expected] = paged_runner(outlier_model).logits([prompt])
    smoothed = copy.deepcopy(outlier_model)
    smooth_model(smoothed, activation_maxima(smoothed, calibration()), alpha=0.5)
    [actual] = paged_runner(smoothed).logits([prompt])
    assert torch.isfinite(actual).all() and relative_error(actual, expected) < 1e-5


def test_bad_smoothing_is_refused(outlier_model: LlamaForCausalLM) -> None:
    maxima = activation_maxima(outlier_model, calibration())
    with pytest.raises(ValueError, match=r"alpha=1.5: the migration strength must be in \[0, 1\]"):
        smooth_model(outlier_model, maxima, alpha=1.5)
    with pytest.raises(ValueError, match="no activation maxima for model.layers.0.self_attn.q_proj"):
        smooth_model(outlier_model, {}, alpha=0.5)
    with pytest.raises(ValueError, match="no calibration sequence"):
        activation_maxima(outlier_model, [])
    quantize_model(outlier_model, "w8a8")
    with pytest.raises(ValueError, match="q_proj is a W8A8Linear: smooth a model before quantizing it"):
        smooth_model(outlier_model, maxima, alpha=0.5)


def test_calibration_sequences_cut_the_text() -> None:
    ids = list(range(10))
    assert [s.tolist() for s in calibration_sequences(ids, 8, 3)] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert len(calibration_sequences(ids, 100, 4)) == 3
    with pytest.raises(ValueError, match="no tokens"):
        calibration_sequences([], 8, 3)
    with pytest.raises(ValueError, match="must be positive"):
        calibration_sequences(ids, 8, 0)

"""Sliding-window perplexity against a direct computation with transformers on the same weights."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from neuron_llm.eval.perplexity import Window, perplexity, sliding_windows
from neuron_llm.models.merge import merge_projections
from neuron_llm.quant import quantize_model


def corpus(length: int = 90) -> list[int]:
    return torch.randint(0, 250, (length,), generator=torch.Generator().manual_seed(3)).tolist()


def hf_sliding_window_nll(hf_model: Any, token_ids: list[int], context: int, stride: int) -> tuple[float, int]:
    """Hugging Face's "perplexity of fixed-length models" loop, scoring from full-window log-softmax."""
    ids = torch.tensor([token_ids])
    total, count, previous_end = 0.0, 0, 0
    for begin in range(0, len(token_ids), stride):
        end = min(begin + context, len(token_ids))
        target_length = end - previous_end  # the tokens the previous window did not score
        with torch.no_grad():
            log_probs = torch.log_softmax(hf_model(ids[:, begin:end]).logits[0].double(), dim=-1)
        window = ids[0, begin:end]
        for j in range(max(1, len(window) - target_length), len(window)):
            total -= log_probs[j - 1, window[j]].item()
            count += 1
        previous_end = end
        if end == len(token_ids):
            break
    return total, count


def test_windows_score_every_token_once() -> None:
    windows = sliding_windows(10, context=4, stride=2)
    assert windows == [Window(0, 4, 3), Window(2, 6, 2), Window(4, 8, 2), Window(6, 10, 2)]
    scored = [t for w in windows for t in range(w.end - w.num_scored, w.end)]
    assert scored == list(range(1, 10))  # token 0 has no history


def test_windows_with_stride_equal_to_context_skip_each_first_token() -> None:
    assert sliding_windows(10, context=4, stride=4) == [Window(0, 4, 3), Window(4, 8, 3), Window(8, 10, 1)]
    assert sliding_windows(3, context=8, stride=2) == [Window(0, 3, 2)]


@pytest.mark.parametrize(
    ("tokens", "context", "stride", "message"),
    [
        (1, 4, 2, r"the text has 1 token\(s\): at least 2"),
        (10, 4, 0, r"stride=0: must be in \[1, context=4\]"),
        (10, 4, 5, r"stride=5: must be in \[1, context=4\]"),
        (10, 1, 1, r"context=1: a window of at least 2 tokens"),
    ],
)
def test_bad_windows_are_refused(tokens: int, context: int, stride: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sliding_windows(tokens, context=context, stride=stride)


@pytest.mark.parametrize(("context", "stride"), [(128, 128), (32, 8), (32, 32), (25, 10)])
def test_perplexity_equals_a_direct_computation(
    quant_checkpoint: tuple[Any, Path],
    load_fp32: Callable,
    context: int,
    stride: int,
) -> None:
    hf_model, path = quant_checkpoint
    token_ids = corpus()
    model = load_fp32(path).model
    result = perplexity(model, token_ids, context=context, stride=stride, logits_chunk=5)  # several chunks a window
    expected_nll, expected_count = hf_sliding_window_nll(hf_model, token_ids, context, stride)
    assert result.num_tokens == expected_count
    assert result.negative_log_likelihood == pytest.approx(expected_nll, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(expected_nll / expected_count), rel=1e-5)
    if context >= len(token_ids):
        # One window: the plain full-sequence perplexity, every token but the first scored.
        with torch.no_grad():
            loss = hf_model(torch.tensor([token_ids]), labels=torch.tensor([token_ids])).loss
        assert result.perplexity == pytest.approx(math.exp(loss.item()), rel=1e-5)


def test_perplexity_of_a_model_with_merged_projections(quant_checkpoint: tuple[Any, Path], load_fp32: Callable) -> None:
    # As the CUDA backend prepares every model an engine runs.
    model = load_fp32(quant_checkpoint[1]).model
    separate = perplexity(model, corpus(), context=32, stride=16)
    merge_projections(model)
    assert model.model.layers[0].self_attn.k_proj is None
    merged = perplexity(model, corpus(), context=32, stride=16)
    assert merged.num_tokens == separate.num_tokens
    assert merged.perplexity == pytest.approx(separate.perplexity, rel=1e-5)


def test_perplexity_of_a_quantized_model(quant_checkpoint: tuple[Any, Path], load_fp32: Callable) -> None:
    model = load_fp32(quant_checkpoint[1]).model
    baseline = perplexity(model, corpus(), context=32, stride=16)
    quantize_model(model, "int8")
    quantized = perplexity(model, corpus(), context=32, stride=16)
    assert quantized.num_tokens == baseline.num_tokens
    # Close to the 16-bit model's, but not equal to it: the int8 weights were scored.
    assert quantized.perplexity == pytest.approx(baseline.perplexity, rel=0.01)
    assert quantized.perplexity != baseline.perplexity


def test_context_beyond_the_model_is_refused(quant_checkpoint: tuple[Any, Path], load_fp32: Callable) -> None:
    with pytest.raises(ValueError, match=r"context=512 exceeds the model's context \(max_position_embeddings=256\)"):
        perplexity(load_fp32(quant_checkpoint[1]).model, corpus(), context=512, stride=256)


def test_token_ids_that_the_model_cannot_score_are_named(
    quant_checkpoint: tuple[Any, Path], load_fp32: Callable
) -> None:
    model = load_fp32(quant_checkpoint[1]).model
    vocab = model.config.vocab_size
    with pytest.raises(ValueError, match=r"token_ids of shape \(1, 90\): must be one sequence"):
        perplexity(model, torch.tensor([corpus()]), context=32, stride=16)
    for bad in (vocab, -1):
        with pytest.raises(ValueError, match=rf"token id {bad} is outside the model's vocabulary of {vocab}"):
            perplexity(model, [*corpus(), bad], context=32, stride=16)
    with pytest.raises(ValueError, match="logits_chunk=0: must be at least 1"):
        perplexity(model, corpus(), context=32, stride=16, logits_chunk=0)

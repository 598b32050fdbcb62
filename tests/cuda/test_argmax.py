"""The split argmax against torch.argmax (ties, chunk edges, -inf, NaN), and the sampled draw
against the reference backend's."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from neuron_llm.backends.cuda.argmax import CHUNK, MAX_ROWS, argmax, sample_argmax, takes
from neuron_llm.backends.cuda.backend import CudaBackend
from neuron_llm.backends.torch_backend import TorchBackend


@pytest.mark.parametrize("num_rows", [1, 3, MAX_ROWS])
@pytest.mark.parametrize("vocab", [1, 100, CHUNK, CHUNK + 1, 128256])
def test_argmax_is_torchs(num_rows: int, vocab: int, device: torch.device) -> None:
    generator = torch.Generator().manual_seed(num_rows * vocab)
    logits = torch.randn(num_rows, vocab, generator=generator) * 4
    assert torch.equal(argmax(logits.to(device)).cpu(), logits.argmax(dim=-1))


def test_ties_take_the_first_index(device: torch.device) -> None:
    vocab = 5 * CHUNK + 7
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(0))
    ties = [(0, [10, 11]), (1, [CHUNK - 1, CHUNK]), (2, [4 * CHUNK + 3, CHUNK + 2]), (3, [vocab - 1, 0])]
    for row, columns in ties:
        logits[row, columns] = 100.0
    logits[4] = float("-inf")  # every logit -inf: index 0, as torch
    logits[5, [9, 3 * CHUNK]] = float("nan")
    got = argmax(logits.to(device)).cpu()
    assert got.tolist() == [10, CHUNK - 1, CHUNK + 2, 0, 0, 9]
    assert torch.equal(got, logits.argmax(dim=-1))


def test_half_precision_logits(device: torch.device) -> None:
    logits = torch.randn(2, 3000, generator=torch.Generator().manual_seed(1)).to(torch.float16)
    assert torch.equal(argmax(logits.to(device)).cpu(), logits.float().argmax(dim=-1))


def test_shapes_it_does_not_take() -> None:
    assert not takes(torch.zeros(MAX_ROWS + 1, 10))
    assert not takes(torch.zeros(0, 10))
    assert not takes(torch.zeros(10, 4).t())
    assert not takes(torch.zeros(2, 10, dtype=torch.float64))  # float32 would merge near values
    with pytest.raises(ValueError, match=r"argmax takes 1..16 rows of contiguous logits, got \(17, 10\)"):
        argmax(torch.zeros(MAX_ROWS + 1, 10))


def draw_inputs(num_rows: int, vocab: int, device: torch.device, seed: int) -> tuple[torch.Tensor, ...]:
    """Logits (a few truncated to -inf), Exp(1) noise as the sampler draws it, greedy flags."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_rows, vocab, generator=generator) * 2
    logits[:, : vocab // 3] = float("-inf")
    noise = torch.empty(num_rows, vocab).exponential_(generator=generator)
    is_greedy = torch.arange(num_rows) % 3 == 1
    return logits.to(device), noise.to(device), is_greedy.to(device)


@pytest.mark.parametrize(("num_rows", "vocab"), [(1, 100), (5, 3 * CHUNK + 5), (MAX_ROWS + 3, CHUNK)])
def test_sample_argmax_is_the_references(num_rows: int, vocab: int, device: torch.device) -> None:
    logits, noise, is_greedy = draw_inputs(num_rows, vocab, device, seed=num_rows)
    got = sample_argmax(logits, noise, is_greedy)
    assert torch.equal(got, TorchBackend().sample_argmax(logits, noise, is_greedy))
    assert torch.equal(got[is_greedy], logits[is_greedy].argmax(dim=-1))
    assert not torch.equal(got, logits.argmax(dim=-1)), "the noise should move some sampled row"


def test_the_backend_draws_here(device: torch.device, monkeypatch: pytest.MonkeyPatch) -> None:
    logits, noise, is_greedy = draw_inputs(4, 500, device, seed=7)
    calls = []
    monkeypatch.setattr(
        "neuron_llm.backends.cuda.argmax.sample_argmax", lambda *args: calls.append(1) or sample_argmax(*args)
    )
    expected = TorchBackend().sample_argmax(logits, noise, is_greedy)
    assert torch.equal(CudaBackend().sample_argmax(logits, noise, is_greedy), expected)
    assert calls == [1] if device.type == "cuda" else calls == []
    with pytest.raises(ValueError, match="one shape"):
        sample_argmax(logits, noise[:, :10], is_greedy)
    with pytest.raises(ValueError, match="fp32"):
        sample_argmax(logits.half(), noise, is_greedy)
    with pytest.raises(ValueError, match=r"is_greedy must be a contiguous \[4\] tensor"):
        sample_argmax(logits, noise, is_greedy.repeat_interleave(2)[::2])
    # Other logits take the reference's draw.
    assert torch.equal(CudaBackend().sample_argmax(logits.double(), noise.double(), is_greedy), expected)


@pytest.mark.cuda
def test_sample_argmax_on_llama3_rows(device: torch.device) -> None:
    logits, noise, is_greedy = draw_inputs(64, 128256, device, seed=3)
    assert torch.equal(sample_argmax(logits, noise, is_greedy), TorchBackend().sample_argmax(logits, noise, is_greedy))

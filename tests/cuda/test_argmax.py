"""The split greedy argmax against torch.argmax: ties, chunk edges, -inf, NaN."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from neuron_llm.backends.cuda.argmax import CHUNK, MAX_ROWS, argmax, takes


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
    with pytest.raises(ValueError, match=r"argmax takes 1..16 rows of contiguous logits, got \(17, 10\)"):
        argmax(torch.zeros(MAX_ROWS + 1, 10))

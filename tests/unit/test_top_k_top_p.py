"""Top-k and top-p by selection (torch.topk) against the sort, and where the sampler uses each."""

from __future__ import annotations

import pytest
import torch

from neuron_llm.backends.truncation import select_top_k_top_p, sort_top_k_top_p
from neuron_llm.sample import RowState, SamplingBatch, process_logits
from neuron_llm.sampling_params import SamplingParams


def tie_keeping_reference(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Kept-token mask [rows, vocab] in fp64, by value: top-k keeps every logit at or above the
    k-th largest; top-p then keeps every survivor at or above the largest value whose survivors
    at or above it hold top_p of the survivors' mass."""
    kept = torch.zeros(logits.shape, dtype=torch.bool)
    for row, (k, p) in enumerate(zip(top_k, top_p)):
        x = logits[row].double()
        kth = x.sort(descending=True).values[k - 1]
        survivors = x >= kth
        probs = torch.where(survivors, (x - x.max()).exp(), 0.0)
        probs = probs / probs.sum()
        threshold = kth
        if p < 1:
            for value in x[survivors].unique().flip(0):  # largest first
                if probs[x >= value].sum() >= p:
                    threshold = value
                    break
        kept[row] = x >= threshold
    return kept


def test_top_k_alone_equals_the_sort() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(6, 1000, generator=generator)
    top_k = torch.tensor([1, 7, 50, 50, 1000, 1000])  # the last two keep everything
    out = select_top_k_top_p(logits, top_k, None, bound=50)
    assert torch.equal(out, sort_top_k_top_p(logits, top_k, None))
    assert torch.equal(out[4:], logits[4:])
    assert (~out[2].isinf()).sum() == 50


def test_top_k_and_top_p_equal_the_sort_without_ties() -> None:
    generator = torch.Generator().manual_seed(1)
    logits = 2 * torch.randn(8, 3000, generator=generator)
    top_k = torch.tensor([20, 64, 64, 3, 40, 64, 3000, 64])
    top_p = torch.tensor([0.9, 0.5, 1.0, 0.99, 0.2, 1e-6, 1.0, 0.95])
    out = select_top_k_top_p(logits, top_k, top_p, bound=64)
    assert torch.equal(out, sort_top_k_top_p(logits, top_k, top_p))
    assert (~out[5].isinf()).sum() == 1
    assert torch.equal(out[6], logits[6])


def test_ties_past_the_bound_count_and_are_kept() -> None:
    # Logits on a coarse grid share values: the k-th largest is tied with tokens the selection
    # of `bound` logits does not hold, and top-p thresholds fall on runs of ties.
    generator = torch.Generator().manual_seed(2)
    rows = 64
    logits = (torch.randn(rows, 500, generator=generator) * 4).round() / 2
    logits[:2] = 0.0
    logits[:2, 0], logits[:2, 1:41] = 5.0, 4.0  # 40 tokens tied second, past a bound of 30
    k = [int(v) for v in torch.randint(1, 31, (rows,), generator=generator)]
    p = [float(v) for v in torch.rand(rows, generator=generator) * 0.98 + 0.01]
    # With top-k 2 the top token holds e / (e + 40) = 0.064 of its survivors' mass.
    k[:2], p[:2] = [2, 2], [0.06, 0.07]
    out = select_top_k_top_p(logits, torch.tensor(k), torch.tensor(p), bound=30)
    kept = ~out.isinf()
    assert torch.equal(kept, tie_keeping_reference(logits, k, p))
    assert kept[0].sum() == 1 and kept[1].sum() == 41
    assert torch.equal(out[kept], logits[kept])


def test_the_sort_keeps_ties_as_the_selection_does() -> None:
    # A batch sorts when one of its rows has no top-k: a row's kept tokens must not change.
    generator = torch.Generator().manual_seed(3)
    rows, vocab = 64, 300
    logits = (torch.randn(rows, vocab, generator=generator) * 4).round() / 2
    k = [int(v) for v in torch.randint(1, 31, (rows,), generator=generator)]
    p = [float(v) for v in torch.rand(rows, generator=generator) * 0.98 + 0.01]
    sorted_kept = ~sort_top_k_top_p(logits, torch.tensor(k), torch.tensor(p)).isinf()
    selected_kept = ~select_top_k_top_p(logits, torch.tensor(k), torch.tensor(p), bound=30).isinf()
    assert torch.equal(sorted_kept, selected_kept)
    assert torch.equal(sorted_kept, tie_keeping_reference(logits, k, p))
    top_p_alone = ~sort_top_k_top_p(logits, None, torch.tensor(p)).isinf()
    assert torch.equal(top_p_alone, tie_keeping_reference(logits, [vocab] * rows, p))


def test_rejects_a_bound_outside_the_vocabulary() -> None:
    with pytest.raises(ValueError, match="bound=0"):
        select_top_k_top_p(torch.zeros(1, 10), torch.ones(1, dtype=torch.int64), None, bound=0)


def _batch(params: list[SamplingParams], vocab: int) -> SamplingBatch:
    return SamplingBatch.build([RowState(p, [1], []) for p in params], vocab, "cpu")


def test_the_sampler_selects_when_every_sampled_row_has_top_k(monkeypatch: pytest.MonkeyPatch) -> None:
    vocab = 2000
    greedy, top_k = SamplingParams(temperature=0.0), SamplingParams(top_k=40, top_p=0.8)
    assert _batch([greedy, top_k, SamplingParams(top_k=7)], vocab).top_k_bound == 40
    assert _batch([top_k, SamplingParams(top_p=0.9)], vocab).top_k_bound is None
    assert _batch([greedy], vocab).top_k_bound is None

    logits = 3 * torch.randn(3, vocab, generator=torch.Generator().manual_seed(3))
    batch = _batch([greedy, top_k, SamplingParams(top_k=7)], vocab)
    calls = []
    monkeypatch.setattr(
        "neuron_llm.backends.truncation.select_top_k_top_p",
        lambda *args: calls.append(args[-1]) or select_top_k_top_p(*args),
    )
    selected = process_logits(logits, batch)
    assert calls == [40]
    batch.top_k_bound = None
    assert torch.equal(selected, process_logits(logits, batch))  # the sort
    assert torch.equal(selected[0], logits[0])  # the greedy row keeps every token

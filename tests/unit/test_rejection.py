"""The rejection sampler keeps the model's distribution, token by token, whatever the proposals."""

from __future__ import annotations

import math

import pytest
import torch

from neuron_llm.sample import RowState, SamplingBatch, make_generator, sample
from neuron_llm.sample.rejection import expand_rows, verify
from neuron_llm.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0)


def _row(params: SamplingParams = GREEDY, output: tuple[int, ...] = (), generator=None) -> RowState:
    return RowState(params, [1, 2], list(output), generator)


STATIC_PADDING = 3
"""Rows a static verification adds past the sequences' (as the XLA device pads to its bucket)."""

STATIC = pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])


def _verify(logits, rows, draft_token_ids, static: bool):
    """``verify``; ``static``: as a graph-compiling device runs it, on logits padded with random rows."""
    if not static:
        return verify(logits, rows, draft_token_ids)
    padded = torch.cat([logits, torch.randn(STATIC_PADDING, logits.shape[1]) * 10])
    output = verify(padded, rows, draft_token_ids, num_static_rows=padded.shape[0])
    # Padding rows propose nothing and are no sequence's: no sequence past the real ones accepts.
    assert output.num_accepted[len(rows) :].tolist() == [0] * (padded.shape[0] - len(rows))
    return output


def _emitted(output, draft_token_ids) -> list[list[int]]:
    """Each sequence's new tokens: its rows up to the first refusal."""
    tokens, accepted, start = output.token_ids.tolist(), output.num_accepted.tolist(), 0
    new = []
    for drafts, kept in zip(draft_token_ids, accepted):
        new.append(tokens[start : start + kept + 1])
        start += len(drafts) + 1
    return new


@STATIC
def test_greedy_keeps_proposals_while_they_are_the_argmax(static: bool) -> None:
    torch.manual_seed(0)
    logits = torch.randn(8, 10)
    best = logits.argmax(dim=-1).tolist()
    wrong = (best[2] + 1) % 10
    # Sequence 0: two right, then wrong; sequence 1: all right (a bonus token); sequence 2: none.
    drafts = [[best[0], best[1], wrong], [best[4], best[5]], []]
    output = _verify(logits, [_row(), _row(), _row()], drafts, static)
    assert output.num_accepted[:3].tolist() == [2, 2, 0]
    assert _emitted(output, drafts) == [[best[0], best[1], best[2]], [best[4], best[5], best[6]], [best[7]]]


def test_each_row_sees_the_proposals_before_it() -> None:
    rows = expand_rows([_row(output=(7,)), _row()], [[3, 4], []])
    assert [list(row.output_token_ids) for row in rows] == [[7], [7, 3], [7, 3, 4], []]


@STATIC
def test_a_penalty_on_a_proposed_token_applies_in_the_rows_after_it(static: bool) -> None:
    # Token 5 leads every row, by less than the penalty takes off once it was generated.
    logits = torch.zeros(3, 8)
    logits[:, 5], logits[:, 6] = 2.0, 1.5
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    output = _verify(logits, [_row(params)], [[5, 5]], static)
    # Row 0 keeps 5; row 1 has 5 in its history, so 6 leads and the second 5 is refused.
    assert output.num_accepted[:1].tolist() == [1]
    assert _emitted(output, [[5, 5]]) == [[5, 6]]


@STATIC
def test_min_tokens_holds_back_a_proposed_stop_token_only_while_unmet(static: bool) -> None:
    logits = torch.zeros(3, 8)
    logits[:, 0] = 5.0  # the stop token leads
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[0])
    refused = _verify(logits, [_row(params, output=(4,))], [[0, 0]], static)
    kept = _verify(logits, [_row(params, output=(4, 4))], [[0, 0]], static)
    assert refused.num_accepted[:1].tolist() == [0] and refused.token_ids[0].item() != 0
    assert kept.num_accepted[:1].tolist() == [2]


def _reference_probs(logits: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    scaled = logits.double() / temperature
    kth = scaled.topk(top_k, dim=-1).values[..., -1:]
    return scaled.masked_fill(scaled < kth, float("-inf")).softmax(dim=-1)


@STATIC
@pytest.mark.parametrize("seeded", [False, True])
def test_sampled_tokens_keep_the_models_distribution(seeded: bool, static: bool) -> None:
    """Token 1 ~ p0; token 2, given that token 1 was the first proposal, ~ p1; token 3, given
    both proposals, ~ p2: the distribution of plain sampling, position by position."""
    torch.manual_seed(1)
    vocab, num_seqs = 6, 30000
    base = torch.randn(3, vocab) * 1.5
    params = SamplingParams(temperature=0.8, top_k=5, seed=0 if seeded else None)
    drafts = [int(base[0].argsort()[-2]), int(base[1].argsort()[-1])]  # a likely but not top one, the top one
    rows = [_row(params, generator=make_generator(i, "cpu") if seeded else None) for i in range(num_seqs)]
    output = _verify(base.repeat(num_seqs, 1), rows, [drafts] * num_seqs, static)
    emitted = _emitted(output, [drafts] * num_seqs)
    probs = _reference_probs(base, 0.8, 5)

    def check(samples: list[int], p: torch.Tensor) -> None:
        counts = torch.bincount(torch.tensor(samples), minlength=vocab).double() / len(samples)
        sigma = (p * (1 - p) / len(samples)).sqrt()
        assert ((counts - p).abs() <= 5 * sigma + 1e-3).all(), (counts.tolist(), p.tolist())

    check([new[0] for new in emitted], probs[0])
    check([new[1] for new in emitted if new[0] == drafts[0]], probs[1])
    given_both = [new[2] for new in emitted if new[:2] == drafts]
    assert len(given_both) > 3000
    check(given_both, probs[2])


@STATIC
def test_seeded_verification_is_reproducible(static: bool) -> None:
    torch.manual_seed(2)
    logits = torch.randn(8, 50)
    params = SamplingParams(temperature=1.0, seed=3)
    drafts = [[1, 2, 3], [4, 5, 6]]

    def run():
        rows = [_row(params, generator=make_generator(seed, "cpu")) for seed in (3, 4)]
        if static:  # the padding rows draw from the default generator, the seeded ones not
            torch.manual_seed(len(calls) + 100)
        calls.append(1)
        return _verify(logits, rows, drafts, static).token_ids[:8].tolist()

    calls: list[int] = []

    assert run() == run()


def test_seeded_rows_without_proposals_draw_what_plain_sampling_draws() -> None:
    torch.manual_seed(4)
    logits = torch.randn(23, 50)
    params = SamplingParams(temperature=1.0, seed=5)

    def seeded_rows() -> list[RowState]:
        return [_row(params, generator=make_generator(seed, "cpu")) for seed in range(20)]

    # Twenty seeded sequences without proposals, and a neighbour with two.
    verified = verify(logits, [*seeded_rows(), _row()], [[]] * 20 + [[3, 4]])
    plain = sample(logits[:20], SamplingBatch.build(seeded_rows(), 50, "cpu"))
    assert verified.token_ids[:20].tolist() == plain.token_ids.tolist()


@STATIC
def test_logprobs_score_each_emitted_token_under_the_raw_logits(static: bool) -> None:
    torch.manual_seed(3)
    logits = torch.randn(3, 12)
    best = logits.argmax(dim=-1).tolist()
    params = SamplingParams(temperature=0.0, logprobs=2)
    output = _verify(logits, [_row(params)], [[best[0], (best[1] + 1) % 12]], static)
    assert output.logprobs is not None
    emitted = output.token_ids[:2]
    want = logits.double().log_softmax(dim=-1)[torch.arange(2), emitted]
    assert torch.allclose(output.logprobs.token_logprobs[:2].double(), want, atol=1e-6)
    assert output.logprobs.top_token_ids[:3, 0].tolist() == best
    assert math.isclose(output.logprobs.token_ranks[0].item(), 1)

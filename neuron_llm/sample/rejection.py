"""Verifying proposed tokens: the rejection sampler of speculative decoding.

A sequence with proposals ``d_1 .. d_k`` computes its last token and the proposals in one
step, which gives ``k + 1`` rows of logits: row ``j`` is the model's distribution ``p_j`` of
the token after ``d_j`` (row 0: after the last real token). Row by row, proposal ``d_{j+1}``
is kept with probability ``min(1, p_j(d) / q_j(d))`` (Leviathan et al., 2023,
https://arxiv.org/abs/2211.17192); at the first one refused, a token is drawn from the
residual ``max(0, p_j - q_j)`` renormalized, and the sequence stops there; when all are
kept, row ``k`` adds a bonus token drawn from ``p_k``. Each new token then has exactly the
distribution plain decoding would give it.

The proposers here are deterministic (n-gram lookup), so ``q_j`` is all its mass on
``d_{j+1}``: the proposal is kept with probability ``p_j(d)``, and the residual is ``p_j``
with ``d`` removed. A greedy row keeps the proposal when it is the argmax, and otherwise
emits the argmax, as plain greedy decoding would. ``p_j`` is the distribution the sampler
draws from (logit_bias, penalties, min_tokens, temperature, min-p, top-k, top-p), with row ``j``'s
history holding the output so far plus ``d_1 .. d_j``: the history it has if they are kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from neuron_llm import ops
from neuron_llm.sample.sampler import (
    RowState,
    SamplerOutput,
    SamplingBatch,
    counter_uniform,
    draw,
    process_logits,
    score_tokens,
)
from neuron_llm.transfer import to_device


def expand_rows(rows: Sequence[RowState], draft_token_ids: Sequence[Sequence[int]]) -> list[RowState]:
    """One row per logits row of a verification step: row ``j`` of a sequence follows its first ``j`` proposals."""
    return [
        replace(row, output_token_ids=[*row.output_token_ids, *drafts[:j]])
        for row, drafts in zip(rows, draft_token_ids, strict=True)
        for j in range(len(drafts) + 1)
    ]


def _uniform(batch: SamplingBatch, proposal_rows: list[int], num_rows: int, device: torch.device) -> torch.Tensor:
    # A seeded row draws from its sequence's generator (shared by that sequence's rows), so
    # its acceptances are reproducible and independent of the other rows. Rows without a
    # proposal draw nothing: a seeded sequence with none takes from its generator exactly
    # what plain sampling takes. A static batch has no generators: its rows' noise keys give
    # the draw, at a counter past the vocabulary's (its tokens' noise uses those below).
    if batch.noise_keys is not None:
        return counter_uniform(batch.noise_keys, batch.vocab_size)
    uniform = torch.rand(num_rows, device=device)
    for row in proposal_rows:
        generator = batch.generators.get(row)
        if generator is not None:
            uniform[row] = torch.rand((), device=device, generator=generator)
    return uniform


def verify(
    logits: torch.Tensor,
    rows: Sequence[RowState],
    draft_token_ids: Sequence[Sequence[int]],
    eos_token_ids: Sequence[int] = (),
    num_static_rows: int | None = None,
) -> SamplerOutput:
    """Keep a prefix of each sequence's proposals and add one token, from ``logits`` [rows, vocab].

    ``rows[s]`` is sequence ``s`` (as ``sample`` takes it) and ``draft_token_ids[s]`` its
    proposals (possibly none); ``logits`` holds ``len(draft_token_ids[s]) + 1`` rows per
    sequence, in turn. Returns, per logits row, the token emitted if the sequence stops
    there (its proposal when kept, else the residual draw) with ``num_accepted`` per
    sequence; logprobs (when asked for) score those tokens under the raw logits.

    ``num_static_rows``: for a device that compiles a graph per shape, ``logits`` has that
    many rows, those past the sequences' padding; the batch is static
    (``SamplingBatch.build_static``, counter-based draws) and ``num_accepted`` has
    ``num_static_rows`` entries, the sequences' first, so any mix of proposals runs one graph.
    """
    expanded = expand_rows(rows, draft_token_ids)
    num_rows, vocab_size = logits.shape
    device = logits.device
    if num_static_rows is None:
        assert num_rows == len(expanded), (num_rows, len(expanded))
        batch = SamplingBatch.build(expanded, vocab_size, device, eos_token_ids)
    else:
        assert num_rows == num_static_rows, (num_rows, num_static_rows)
        batch = SamplingBatch.build_static(expanded, vocab_size, device, num_static_rows, eos_token_ids)
    processed = process_logits(logits, batch)

    padding = [-1] * (num_rows - len(expanded))
    proposals = [drafts[j] if j < len(drafts) else -1 for drafts in draft_token_ids for j in range(len(drafts) + 1)]
    proposal_rows = [row for row, token_id in enumerate(proposals) if token_id >= 0]
    proposed = to_device(proposals + padding, torch.int64, device)
    has_proposal = proposed >= 0
    proposal = proposed.clamp_min(0).unsqueeze(1)
    if batch.is_all_greedy:
        kept = ops.argmax(processed) == proposed
    else:
        p_proposal = processed.softmax(dim=-1).gather(1, proposal).squeeze(1)
        uniform = _uniform(batch, proposal_rows, num_rows, device)
        kept = torch.where(batch.is_greedy, ops.argmax(processed) == proposed, uniform < p_proposal)
    kept &= has_proposal
    # The residual: the proposal's mass is what keeping it used. A greedy row's residual
    # argmax is its argmax whenever the proposal was refused.
    without_proposal = processed.scatter(1, proposal, float("-inf"))
    residual = torch.where(has_proposal.unsqueeze(1), without_proposal, processed)
    token_ids = torch.where(kept, proposed, draw(residual, batch))

    # num_accepted: the kept proposals before each sequence's first refusal. A row is counted
    # when no row of its sequence up to it was refused: refusals counted from the sequence's
    # first row (a running count, less the count before that row). Padding rows count nowhere.
    seq_of_row = [s for s, drafts in enumerate(draft_token_ids) for _ in range(len(drafts) + 1)]
    first_row = [start for start, n in _row_spans(draft_token_ids) for _ in range(n)]
    pad_rows = range(len(expanded), num_rows)
    seq_index = to_device(seq_of_row + [0] * len(padding), torch.int64, device)
    start_index = to_device(first_row + list(pad_rows), torch.int64, device)
    refused = (has_proposal & ~kept).long()
    refusals = refused.cumsum(dim=0)
    refusals_before_seq = refusals.gather(0, start_index) - refused.gather(0, start_index)
    counted = kept & (refusals - refusals_before_seq == 0)
    num_seqs = len(draft_token_ids) if num_static_rows is None else num_static_rows
    num_accepted = torch.zeros(num_seqs, dtype=torch.int64, device=device).scatter_add(0, seq_index, counted.long())

    logprobs = None
    if batch.num_logprobs is not None:
        logprobs = score_tokens(logits.float().log_softmax(dim=-1), token_ids, batch.num_logprobs)
    return SamplerOutput(token_ids, logprobs, num_accepted)


def _row_spans(draft_token_ids: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """(first row, row count) of each sequence's logits rows."""
    spans, start = [], 0
    for drafts in draft_token_ids:
        spans.append((start, len(drafts) + 1))
        start += len(drafts) + 1
    return spans

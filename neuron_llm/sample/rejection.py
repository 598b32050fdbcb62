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
draws from (penalties, min_tokens, temperature, min-p, top-k, top-p), with row ``j``'s
history holding the output so far plus ``d_1 .. d_j``: the history it has if they are kept.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from neuron_llm import ops
from neuron_llm.sample.sampler import (
    RowState,
    SamplerOutput,
    SamplingBatch,
    draw,
    process_logits,
    score_tokens,
)
from neuron_llm.transfer import to_device


def expand_rows(rows: Sequence[RowState], draft_token_ids: Sequence[Sequence[int]]) -> list[RowState]:
    """One row per logits row of a verification step: row ``j`` of a sequence follows its first ``j`` proposals."""
    return [
        RowState(row.params, row.prompt_token_ids, [*row.output_token_ids, *drafts[:j]], row.generator)
        for row, drafts in zip(rows, draft_token_ids, strict=True)
        for j in range(len(drafts) + 1)
    ]


def _uniform(batch: SamplingBatch, proposal_rows: list[int], num_rows: int, device: torch.device) -> torch.Tensor:
    # A seeded row draws from its sequence's generator (shared by that sequence's rows), so
    # its acceptances are reproducible and independent of the other rows. Rows without a
    # proposal draw nothing: a seeded sequence with none takes from its generator exactly
    # what plain sampling takes.
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
) -> SamplerOutput:
    """Keep a prefix of each sequence's proposals and add one token, from ``logits`` [rows, vocab].

    ``rows[s]`` is sequence ``s`` (as ``sample`` takes it) and ``draft_token_ids[s]`` its
    proposals (possibly none); ``logits`` holds ``len(draft_token_ids[s]) + 1`` rows per
    sequence, in turn. Returns, per logits row, the token emitted if the sequence stops
    there (its proposal when kept, else the residual draw) with ``num_accepted`` per
    sequence; logprobs (when asked for) score those tokens under the raw logits.
    """
    expanded = expand_rows(rows, draft_token_ids)
    num_rows, vocab_size = logits.shape
    assert num_rows == len(expanded), (num_rows, len(expanded))
    device = logits.device
    batch = SamplingBatch.build(expanded, vocab_size, device, eos_token_ids)
    processed = process_logits(logits, batch)

    proposals = [drafts[j] if j < len(drafts) else -1 for drafts in draft_token_ids for j in range(len(drafts) + 1)]
    proposal_rows = [row for row, token_id in enumerate(proposals) if token_id >= 0]
    proposed = to_device(proposals, torch.int64, device)
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

    # num_accepted: the kept proposals before each sequence's first refusal.
    width = max(len(drafts) for drafts in draft_token_ids)
    seq_of_row = [s for s, drafts in enumerate(draft_token_ids) for _ in range(len(drafts) + 1)]
    column = [j for drafts in draft_token_ids for j in range(len(drafts) + 1)]
    grid = torch.zeros(len(draft_token_ids), width + 1, dtype=torch.int64, device=device)
    grid[to_device(seq_of_row, torch.int64, device), to_device(column, torch.int64, device)] = kept.long()
    num_accepted = grid.cumprod(dim=1).sum(dim=1)

    logprobs = None
    if batch.num_logprobs is not None:
        logprobs = score_tokens(logits.float().log_softmax(dim=-1), token_ids, batch.num_logprobs)
    return SamplerOutput(token_ids, logprobs, num_accepted)

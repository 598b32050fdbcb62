"""Top-k and top-p truncation of sampling logits in plain torch: the reference backend's forms.

- ``sort_top_k_top_p`` sorts every row of the vocabulary once; both truncations then mask a
  prefix of the sorted row. Shapes never depend on the values, so it suits a backend that
  compiles one graph per shape.
- ``select_top_k_top_p`` takes each row's ``bound`` largest logits (``torch.topk``) instead,
  when every row that truncates keeps at most ``bound`` tokens by top-k: top-k's threshold
  is among them, and so is top-p's, whose mass runs over top-k's survivors only. For
  ``bound`` << vocab it is several times faster than the sort (BENCHMARKS.md).

Ties: both keep every token tied at the k-th largest logit and every token tied at top-p's
threshold, as the cuda backend's top-p kernel does, so which form a batch takes does not
change what a row keeps, up to rounding: the two sum top-p's mass in other orders, so a
token whose cumulative mass lies within rounding of ``top_p`` may be kept by one and not the
other.
"""

from __future__ import annotations

import torch

SELECT_MAX_K = 1024
"""The largest ``bound`` the selection takes; larger bounds sort (torch.topk's cost grows with k)."""


def selection_bound(logits: torch.Tensor, top_k: torch.Tensor | None, top_k_bound: int | None) -> int | None:
    """The logits a row ``select_top_k_top_p`` takes for a ``Backend.top_k_top_p`` call, or None
    where the sort is the way: no top-k, no bound, or a bound past ``SELECT_MAX_K``."""
    if top_k is None or top_k_bound is None or top_k_bound > SELECT_MAX_K:
        return None
    return min(top_k_bound, logits.shape[-1])


def sort_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """``logits`` [rows, vocab] with ``-inf`` where top-k (int64 [rows], ``vocab`` for none)
    or then top-p (fp32 [rows], 1 for none) drops a token: a new tensor."""
    sorted_logits, order = logits.sort(dim=-1)  # ascending
    vocab = logits.shape[-1]
    if top_k is not None:
        kth_largest = sorted_logits.gather(1, (vocab - top_k).unsqueeze(1))
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_largest, float("-inf"))
    if top_p is not None:
        # Drop the least likely tokens while the mass they hold stays <= 1 - top_p, which
        # leaves the smallest set of most likely tokens holding at least top_p.
        # Tokens tied with the least likely one kept are kept too, wherever the sort put them.
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        dropped = cumulative <= 1 - top_p.unsqueeze(1)
        dropped[:, -1] = False
        threshold = sorted_logits.gather(1, dropped.sum(dim=-1, keepdim=True))
        sorted_logits = sorted_logits.masked_fill(sorted_logits < threshold, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def select_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor | None, bound: int
) -> torch.Tensor:
    """As ``sort_top_k_top_p`` with top-k given, from each row's ``bound`` largest logits.

    Rows whose top-k exceeds ``bound`` keep every token, so they must not have top-p: the
    sampler gives greedy rows, and only them, top-k ``vocab`` and top-p 1 in such a batch.
    """
    vocab = logits.shape[-1]
    if not 1 <= bound <= vocab:
        raise ValueError(f"bound={bound} must be in [1, vocab={vocab}]")
    values = logits.topk(bound, dim=-1).values  # [rows, bound], largest first
    kth = values.gather(1, (top_k.clamp(max=bound) - 1).unsqueeze(1))  # [rows, 1]
    kth = kth.masked_fill((top_k > bound).unsqueeze(1), float("-inf"))
    threshold = kth
    if top_p is not None:
        threshold = torch.maximum(kth, _top_p_threshold(logits, values, kth, top_p))
    return logits.masked_fill(logits < threshold, float("-inf"))


def _top_p_threshold(
    logits: torch.Tensor, values: torch.Tensor, kth: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """[rows, 1]: the largest logit whose top-k survivors at or above it hold ``top_p`` of the
    survivors' mass (``-inf`` for rows without top-p)."""
    survivors = values >= kth
    weights = torch.where(survivors, (values - values[:, :1]).exp(), 0.0)
    cumulative = weights.cumsum(dim=-1)
    # Survivors past the bound are tokens tied with the k-th largest logit (tokens can share a
    # value): they add to the total only, since the threshold cannot fall below their value.
    extra = (logits >= kth).sum(dim=-1, keepdim=True) - survivors.sum(dim=-1, keepdim=True)
    total = cumulative[:, -1:] + extra * (kth - values[:, :1]).exp()
    # The first value whose running sum reaches the target: ties after it in the selection
    # share its value, so the mass at or above it (ties included) reaches the target too.
    first = (cumulative < top_p.unsqueeze(1) * total).sum(dim=-1, keepdim=True).clamp(max=values.shape[1] - 1)
    threshold = values.gather(1, first)
    return threshold.masked_fill(top_p.unsqueeze(1) >= 1, float("-inf"))

"""Measuring a model's quality: sliding-window perplexity and greedy agreement between formats."""

from __future__ import annotations

from neuron_llm.eval.agreement import greedy_continuations, token_agreement
from neuron_llm.eval.perplexity import PerplexityResult, Window, perplexity, sliding_windows

__all__ = [
    "PerplexityResult",
    "Window",
    "greedy_continuations",
    "perplexity",
    "sliding_windows",
    "token_agreement",
]

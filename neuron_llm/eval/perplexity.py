"""Sliding-window perplexity of a causal language model over a long token sequence.

The method of Hugging Face's "Perplexity of fixed-length models": windows of ``context``
tokens start every ``stride`` tokens, and each window scores only the tokens the previous
window did not, so every scored token past the first window sees at least ``context - stride``
tokens of history (and the first window's, all the tokens before them)::

    tokens:   0 .......................................................... N
    window 0: [==================== scored ====================]
    window 1:             [....... context only ........|== scored ==]
    window 2:                          [....... context only ........|== scored ==]

A token is scored by the log-probability the model gave it at the position before it, so the
first token of the text is never scored (nor, when ``stride == context``, the first of each
window). Perplexity is ``exp(total negative log-likelihood / tokens scored)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from neuron_llm.models.llama import KVCache, LlamaForCausalLM
from neuron_llm.ops.metadata import AttentionMetadata
from neuron_llm.worker import allocate_kv_cache

LOGITS_CHUNK = 256
"""Positions whose logits are computed at once: 256 x a 128k vocabulary is 128 MiB in fp32."""
KV_BLOCK_SIZE = 16


@dataclass(frozen=True)
class Window:
    """Tokens ``[begin, end)`` run through the model; the last ``num_scored`` of them are scored."""

    begin: int
    end: int
    num_scored: int


@dataclass(frozen=True)
class PerplexityResult:
    num_tokens: int
    """Tokens scored."""
    negative_log_likelihood: float
    """Summed over the scored tokens, in nats."""

    @property
    def perplexity(self) -> float:
        return math.exp(self.negative_log_likelihood / self.num_tokens)


def sliding_windows(num_tokens: int, context: int, stride: int) -> list[Window]:
    """The windows over ``num_tokens`` tokens, ``context`` long, starting every ``stride`` tokens."""
    if context < 2:
        raise ValueError(f"context={context}: a window of at least 2 tokens is needed to score one")
    if not 0 < stride <= context:
        raise ValueError(f"stride={stride}: must be in [1, context={context}]")
    if num_tokens < 2:
        raise ValueError(f"the text has {num_tokens} token(s): at least 2 are needed to score one")
    windows = []
    scored_until = 1  # token 0 has no history
    for begin in range(0, num_tokens, stride):
        end = min(begin + context, num_tokens)
        first_scored = max(scored_until, begin + 1)
        windows.append(Window(begin, end, end - first_scored))
        scored_until = end
        if end == num_tokens:
            break
    return windows


@torch.inference_mode()
def window_negative_log_likelihood(
    model: LlamaForCausalLM,
    token_ids: torch.Tensor,
    num_scored: int,
    kv_caches: list[KVCache],
    block_size: int,
    logits_chunk: int = LOGITS_CHUNK,
) -> float:
    """Summed NLL of the last ``num_scored`` of ``token_ids`` [L], one sequence at positions 0..L-1.

    ``kv_caches`` must hold at least ``ceil(L / block_size) + 1`` blocks (block 0 is the null
    block); the window overwrites whatever an earlier window left there.
    """
    length = token_ids.shape[0]
    if num_scored == 0:
        return 0.0
    hidden = forward_sequence(model, token_ids, kv_caches, block_size)  # [L, hidden_size]
    # Position i predicts token i + 1: the scored tokens are predicted by the rows before them.
    rows = hidden[length - num_scored - 1 : length - 1]
    targets = token_ids[length - num_scored :]
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    for start in range(0, num_scored, logits_chunk):
        logits = model.compute_logits(rows[start : start + logits_chunk])  # [chunk, vocab] fp32
        log_probs = torch.log_softmax(logits, dim=-1)
        picked = log_probs.gather(1, targets[start : start + logits_chunk, None])
        total -= picked.sum(dtype=torch.float64)
    return float(total)


def model_kv_caches(model: LlamaForCausalLM, num_blocks: int, block_size: int = KV_BLOCK_SIZE) -> list[KVCache]:
    """A KV cache of ``num_blocks`` blocks (block 0 the null block) in the model's dtype and device."""
    config = model.config
    embedding = model.model.embed_tokens.weight
    # The projections' widths give the KV heads this model holds (fewer under tensor
    # parallelism); a backend may have merged them into one QKV matmul.
    attention = model.model.layers[0].self_attn
    key_width = attention.qkv_sizes[1] if attention.k_proj is None else attention.k_proj.out_features
    num_kv_heads = key_width // config.head_dim
    return allocate_kv_cache(config, num_blocks, block_size, num_kv_heads, embedding.dtype, embedding.device)


def sequence_kv_caches(model: LlamaForCausalLM, max_len: int, block_size: int = KV_BLOCK_SIZE) -> list[KVCache]:
    """A KV cache with room for one sequence of ``max_len`` tokens (and the null block)."""
    return model_kv_caches(model, 1 + -(-max_len // block_size), block_size)


def forward_sequence(
    model: LlamaForCausalLM, token_ids: torch.Tensor, kv_caches: list[KVCache], block_size: int
) -> torch.Tensor:
    """The final hidden states [L, hidden_size] of one sequence ``token_ids`` [L] at positions 0..L-1.

    Overwrites blocks 1.. of ``kv_caches`` (``sequence_kv_caches``).
    """
    length = token_ids.shape[0]
    device = token_ids.device
    blocks = list(range(1, 1 + -(-length // block_size)))
    metadata = AttentionMetadata.build([length], [length], [blocks], block_size, device)
    return model(token_ids, torch.arange(length, device=device), kv_caches, metadata)


def perplexity(
    model: LlamaForCausalLM,
    token_ids: Sequence[int] | torch.Tensor,
    *,
    context: int = 2048,
    stride: int = 512,
    logits_chunk: int = LOGITS_CHUNK,
    show_progress: bool = False,
) -> PerplexityResult:
    """Sliding-window perplexity of ``model`` on ``token_ids`` (see the module docstring).

    Works for any weight format: it runs the model's own forward over a KV cache sized for
    one window, and computes the logits of ``logits_chunk`` positions at a time.
    ``show_progress`` draws a tqdm bar over the windows.
    """
    config = model.config
    if context > config.max_context_len:
        raise ValueError(f"context={context} exceeds the model's context ({config.describe_context()})")
    if logits_chunk < 1:
        raise ValueError(f"logits_chunk={logits_chunk}: must be at least 1")
    embedding = model.model.embed_tokens.weight
    tokens = torch.as_tensor(token_ids, dtype=torch.int64).to(embedding.device)
    if tokens.dim() != 1:
        raise ValueError(f"token_ids of shape {tuple(tokens.shape)}: must be one sequence, a 1-D list of ids")
    if tokens.numel() and not (0 <= int(tokens.min()) and int(tokens.max()) < config.vocab_size):
        bad = int(tokens.min()) if int(tokens.min()) < 0 else int(tokens.max())
        raise ValueError(f"token id {bad} is outside the model's vocabulary of {config.vocab_size}")
    windows = sliding_windows(tokens.shape[0], context, stride)
    kv_caches = sequence_kv_caches(model, context)
    progress = None
    if show_progress:
        from tqdm import tqdm

        progress = tqdm(total=len(windows), desc="perplexity", unit="window")
    result = PerplexityResult(0, 0.0)
    for window in windows:
        nll = window_negative_log_likelihood(
            model, tokens[window.begin : window.end], window.num_scored, kv_caches, KV_BLOCK_SIZE, logits_chunk
        )
        result = PerplexityResult(result.num_tokens + window.num_scored, result.negative_log_likelihood + nll)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(ppl=f"{result.perplexity:.3f}")
    if progress is not None:
        progress.close()
    return result

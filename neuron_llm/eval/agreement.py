"""Greedy agreement: how often a model in one weight format picks the same next tokens as in another."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from neuron_llm.eval.perplexity import KV_BLOCK_SIZE, model_kv_caches
from neuron_llm.models.llama import LlamaForCausalLM
from neuron_llm.ops.metadata import AttentionMetadata


@torch.inference_mode()
def greedy_continuations(
    model: LlamaForCausalLM, prompts: Sequence[Sequence[int]], num_new_tokens: int
) -> list[list[int]]:
    """The ``num_new_tokens`` greedy tokens after each prompt, all prompts in one flat batch.

    One prefill step for every prompt, then one decode step per token; no stop tokens.
    """
    device = model.model.embed_tokens.weight.device
    blocks_per_seq = -(-(max(map(len, prompts)) + num_new_tokens) // KV_BLOCK_SIZE)
    kv_caches = model_kv_caches(model, 1 + len(prompts) * blocks_per_seq)
    # Sequence s owns blocks 1 + s * blocks_per_seq ...; block 0 is the null block.
    tables = [list(range(1 + s * blocks_per_seq, 1 + (s + 1) * blocks_per_seq)) for s in range(len(prompts))]
    seq_lens = [len(p) for p in prompts]
    step_tokens = [list(p) for p in prompts]
    outputs: list[list[int]] = [[] for _ in prompts]
    for _ in range(num_new_tokens):
        query_lens = [len(t) for t in step_tokens]
        metadata = AttentionMetadata.build(query_lens, seq_lens, tables, KV_BLOCK_SIZE, device)
        positions = [p for q, n in zip(query_lens, seq_lens) for p in range(n - q, n)]
        input_ids = torch.tensor([t for tokens in step_tokens for t in tokens], device=device)
        hidden = model(input_ids, torch.tensor(positions, device=device), kv_caches, metadata)
        last_rows = torch.tensor(metadata.query_start_loc_host[1:], device=device) - 1
        next_tokens = model.compute_logits(hidden.index_select(0, last_rows)).argmax(dim=-1).tolist()
        for output, token in zip(outputs, next_tokens):
            output.append(token)
        step_tokens = [[t] for t in next_tokens]
        seq_lens = [n + 1 for n in seq_lens]
    return outputs


def mean_identical_prefix(reference: Sequence[Sequence[int]], other: Sequence[Sequence[int]]) -> float:
    """Mean number of leading tokens ``other``'s continuations share with ``reference``'s.

    Greedy continuations part ways at the first differing token and rarely meet again, so
    this is where each one diverged.
    """
    lengths = []
    for ref, out in zip(reference, other, strict=True):
        same = [a == b for a, b in zip(ref, out, strict=True)]
        lengths.append(same.index(False) if False in same else len(same))
    return sum(lengths) / len(lengths)


def token_agreement(reference: Sequence[Sequence[int]], other: Sequence[Sequence[int]]) -> float:
    """Share of positions, over all sequences, where ``other`` holds the same token as ``reference``."""
    pairs = [(a, b) for ref, out in zip(reference, other, strict=True) for a, b in zip(ref, out, strict=True)]
    return sum(a == b for a, b in pairs) / len(pairs)

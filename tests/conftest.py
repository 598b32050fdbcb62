"""Shared test fixtures: tiny random Hugging Face Llama checkpoints and a paged-cache runner."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import PreTrainedTokenizerBase

from neuron_llm.models.llama import KVCache, LlamaForCausalLM
from neuron_llm.ops.metadata import AttentionMetadata
from tests.tokenizer_kinds import byte_level_bpe, sentencepiece_bpe, smollm2

BOUNDED_JSON_SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["ok", "n"],
    "additionalProperties": False,
    "x-guidance": {"whitespace_flexible": False},
}
"""Compact JSON whose every value is bounded: any path through it, a random model's too, ends
in a few tokens (structured outputs)."""


def fits_bounded_schema(value: Any) -> bool:
    """Whether ``value`` (parsed JSON) is what ``BOUNDED_JSON_SCHEMA`` allows."""
    return (
        isinstance(value, dict)
        and set(value) == {"ok", "n"}
        and isinstance(value["ok"], bool)
        and isinstance(value["n"], int)
        and 0 <= value["n"] <= 9
    )


TINY_LLAMA = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    # Larger than the usual 0.02 so logits are peaked and greedy picks are far from ties.
    initializer_range=0.2,
    # No EOS: transformers' generate must run the full number of tokens, as our greedy loop does.
    eos_token_id=None,
    bos_token_id=None,
    pad_token_id=None,
)


def build_hf_llama(**overrides: Any) -> Any:
    """A transformers ``LlamaForCausalLM`` with seeded random weights, fp32, in eval mode."""
    from transformers import LlamaConfig
    from transformers import LlamaForCausalLM as HFLlama

    torch.manual_seed(0)
    config = LlamaConfig(**{**TINY_LLAMA, **overrides})
    return HFLlama(config).eval()


@pytest.fixture
def tiny_hf_llama() -> Callable[..., Any]:
    """Factory: a random tiny transformers Llama (config overrides as keywords), not saved."""
    return build_hf_llama


@pytest.fixture
def save_tiny_llama(tmp_path: Path) -> Callable[..., tuple[Any, Path]]:
    """Factory: save a random tiny Llama (config overrides as keywords) and return (hf_model, dir).

    ``max_shard_size`` is passed to ``save_pretrained`` to force a sharded checkpoint.
    """

    def save(max_shard_size: str | None = None, **overrides: Any) -> tuple[Any, Path]:
        model = build_hf_llama(**overrides)
        path = tmp_path / "model"
        kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        model.save_pretrained(path, **kwargs)
        return model, path

    return save


class PagedRunner:
    """Runs our model the way the engine does: flat batches over a paged KV cache.

    Each sequence owns consecutive blocks from 1 on (block 0 is reserved for padding).
    """

    def __init__(self, model: LlamaForCausalLM, block_size: int = 4, blocks_per_seq: int = 32) -> None:
        self.model = model
        self.block_size = block_size
        self.blocks_per_seq = blocks_per_seq

    def _caches(self, num_seqs: int) -> list[KVCache]:
        config = self.model.config
        weight = self.model.model.embed_tokens.weight
        # Each layer: [num_blocks, block_size, num_kv_heads, head_dim], zeros like a fresh pool.
        shape = (1 + num_seqs * self.blocks_per_seq, self.block_size, config.num_key_value_heads, config.head_dim)
        return [
            (
                torch.zeros(shape, dtype=weight.dtype, device=weight.device),
                torch.zeros(shape, dtype=weight.dtype, device=weight.device),
            )
            for _ in range(config.num_hidden_layers)
        ]

    def _step(self, caches: list[KVCache], new_tokens: list[list[int]], seq_lens: list[int]) -> list[torch.Tensor]:
        """Compute ``new_tokens[s]`` (the last tokens of each sequence) in one flat batch."""
        device = self.model.model.embed_tokens.weight.device
        tables = [
            list(range(1 + s * self.blocks_per_seq, 1 + (s + 1) * self.blocks_per_seq)) for s in range(len(seq_lens))
        ]
        query_lens = [len(tokens) for tokens in new_tokens]
        metadata = AttentionMetadata.build(query_lens, seq_lens, tables, self.block_size, device)
        positions = [p for q, n in zip(query_lens, seq_lens, strict=True) for p in range(n - q, n)]
        input_ids = torch.tensor([t for tokens in new_tokens for t in tokens], device=device)
        with torch.no_grad():
            hidden = self.model(input_ids, torch.tensor(positions, device=device), caches, metadata)
            logits = self.model.compute_logits(hidden)
        return list(logits.split(query_lens))

    def logits(self, prompts: list[list[int]]) -> list[torch.Tensor]:
        """All-position logits [len(prompt), vocab] of each prompt, all prompts in one flat batch."""
        return self._step(self._caches(len(prompts)), prompts, [len(p) for p in prompts])

    def greedy(self, prompts: list[list[int]], num_new_tokens: int) -> list[list[int]]:
        """Greedy continuations: one prefill step for all prompts, then one token per sequence a step."""
        caches = self._caches(len(prompts))
        seq_lens = [len(p) for p in prompts]
        logits = self._step(caches, prompts, seq_lens)
        outputs: list[list[int]] = [[] for _ in prompts]
        for step in range(num_new_tokens):
            next_tokens = [int(rows[-1].argmax()) for rows in logits]
            for output, token in zip(outputs, next_tokens, strict=True):
                output.append(token)
            if step + 1 < num_new_tokens:
                seq_lens = [n + 1 for n in seq_lens]
                logits = self._step(caches, [[t] for t in next_tokens], seq_lens)
        return outputs


@pytest.fixture
def paged_runner() -> type[PagedRunner]:
    """The ``PagedRunner`` class: wrap a loaded model to get its logits and greedy continuations."""
    return PagedRunner


@pytest.fixture(
    scope="module",
    params=[
        pytest.param(byte_level_bpe, id="byte-level"),
        pytest.param(sentencepiece_bpe, id="sentencepiece"),
        pytest.param(smollm2, id="smollm2", marks=pytest.mark.slow),
    ],
)
def tokenizer(request: pytest.FixtureRequest) -> PreTrainedTokenizerBase:
    """Each kind of tokenizer in tests/tokenizer_kinds.py."""
    return request.param()

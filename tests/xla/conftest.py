"""Fixtures of the torch-xla tests: PJRT on the CPU, tiny random Llamas, bucketed greedy steps.

Nothing here imports torch_xla, so the CPU-only test module beside these runs without it.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

# Read by torch_xla when it is first imported (by the test modules, after this file).
os.environ.setdefault("PJRT_DEVICE", "CPU")
if os.environ["PJRT_DEVICE"] == "CPU":
    # The CPU backend's LLVM passes take most of a compile (about 3 s down to 1 s a graph here);
    # the HLO, and so what the tests check, is the same without them.
    os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

from neuron_llm.config import CacheConfig, DeviceConfig, EngineConfig, ModelConfig
from neuron_llm.models.llama import LlamaForCausalLM
from neuron_llm.worker import StepInput, Worker

BLOCK_SIZE = 4
MAX_BLOCKS_PER_SEQ = 8

Bucket = tuple[int, int]
"""(num_tokens, num_seqs) a step is padded to; every bucket's block table is MAX_BLOCKS_PER_SEQ wide."""


def sync_as_served(roots: list[torch.Tensor]) -> bytes:
    """Run the graph of ``roots`` with its outputs in the order ``torch_xla.sync()`` collects live
    tensors (by tensor id); return that graph's HLO module. A step's graph compiled before is
    found again only when this is its module (the order is part of the module)."""
    import torch_xla

    ordered = sorted(roots, key=torch_xla._XLAC._xla_get_tensor_id)
    proto = torch_xla._XLAC._get_xla_tensors_hlo_proto(ordered)
    torch_xla._XLAC._xla_sync_multi(ordered, [], False, True)
    return proto


def tiny_model(vocab_size: int) -> LlamaForCausalLM:
    """A 2-layer GQA Llama (6 query heads over 2 KV heads) with seeded random weights.

    std 0.2 keeps greedy picks far from ties; the vocabulary size tells graphs apart.
    """
    config = ModelConfig(
        vocab_size=vocab_size, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    for parameter in model.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    return model


class GreedyDriver:
    """Drives a worker the way the engine does: flat steps padded to buckets, greedy tokens.

    Sequence ``s`` owns blocks ``1 + s * MAX_BLOCKS_PER_SEQ ...`` (block 0 is the null block)
    and hands each step only the blocks its context needs. A sequence samples once its whole
    prompt is computed.
    """

    def __init__(self, worker: Worker, prompts: list[list[int]], buckets: list[Bucket]) -> None:
        self.worker = worker
        self.buckets = sorted(buckets)
        self.tokens = [list(prompt) for prompt in prompts]
        self.num_computed = [0] * len(prompts)
        self.generated: list[list[int]] = [[] for _ in prompts]

    def plan(self, chunks: list[tuple[int, int]]) -> StepInput:
        """The step computing ``num_tokens`` more tokens of each ``(sequence, num_tokens)``."""
        input_ids, positions, query_lens, seq_lens, tables, rows = [], [], [], [], [], []
        for seq, num_tokens in chunks:
            start = self.num_computed[seq]
            seq_len = start + num_tokens
            assert seq_len <= len(self.tokens[seq]), "schedule only tokens that exist"
            input_ids += self.tokens[seq][start:seq_len]
            positions += list(range(start, seq_len))
            query_lens.append(num_tokens)
            seq_lens.append(seq_len)
            first_block = 1 + seq * MAX_BLOCKS_PER_SEQ
            tables.append(list(range(first_block, first_block + -(-seq_len // BLOCK_SIZE))))
            rows.append(len(input_ids) - 1)
        num_tokens, num_seqs = next(b for b in self.buckets if b[0] >= len(input_ids) and b[1] >= len(chunks))
        return StepInput(
            input_ids, positions, query_lens, seq_lens, tables, rows,
            num_padded_tokens=num_tokens, num_padded_seqs=num_seqs, max_blocks_per_seq=MAX_BLOCKS_PER_SEQ,
        )  # fmt: skip

    def run(self, step: StepInput) -> torch.Tensor:
        """Execute ``step``; its logits on the CPU."""
        return self.worker.execute(step).cpu()

    def step(self, chunks: list[tuple[int, int]]) -> torch.Tensor:
        """Run one step; append the greedy token of each sequence done with its prompt; return the logits."""
        logits = self.run(self.plan(chunks))
        for (seq, num_tokens), row in zip(chunks, logits):
            self.num_computed[seq] += num_tokens
            if self.num_computed[seq] == len(self.tokens[seq]):
                token = int(row.argmax())
                self.tokens[seq].append(token)
                self.generated[seq].append(token)
        return logits

    def decode_all(self) -> list[tuple[int, int]]:
        """One token of every sequence."""
        return [(seq, 1) for seq in range(len(self.tokens))]


def engine_config(model: LlamaForCausalLM, device: str) -> EngineConfig:
    return EngineConfig(
        model=model.config, device=DeviceConfig(device=device), cache=CacheConfig(block_size=BLOCK_SIZE)
    )


MakeDriver = Callable[[LlamaForCausalLM, list[list[int]], list[Bucket], bool], GreedyDriver]


@pytest.fixture
def make_driver() -> MakeDriver:
    """Factory: ``make_driver(model, prompts, buckets, on_xla)`` -> a ``GreedyDriver``.

    ``on_xla`` runs an ``XlaWorker`` with the neuron backend (the model moves to the XLA
    device); otherwise a CPU ``Worker`` with the torch reference backend.
    """

    def make(model: LlamaForCausalLM, prompts: list[list[int]], buckets: list[Bucket], on_xla: bool) -> GreedyDriver:
        num_kv_blocks = 1 + len(prompts) * MAX_BLOCKS_PER_SEQ
        if on_xla:
            from neuron_llm.xla.runner import XlaWorker

            worker = XlaWorker(model, engine_config(model, "xla"), num_kv_blocks)
            return GreedyDriver(worker, prompts, buckets)
        worker = Worker(model, engine_config(model, "cpu"), num_kv_blocks)
        return GreedyDriver(worker, prompts, buckets)

    return make


@pytest.fixture
def tiny_llama() -> Callable[[int], LlamaForCausalLM]:
    """Factory: ``tiny_llama(vocab_size)`` -> the seeded random tiny Llama on the CPU."""
    return tiny_model

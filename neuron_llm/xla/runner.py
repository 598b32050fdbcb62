"""A worker on the XLA device: each engine step is exactly one graph of a bucket's shapes."""

from __future__ import annotations

import logging

import torch

from neuron_llm.config import EngineConfig
from neuron_llm.models.llama import LlamaForCausalLM
from neuron_llm.ops.metadata import AttentionMetadata
from neuron_llm.worker import StepInput, Worker
from neuron_llm.xla.device import compile_count, sync, xla_device

logger = logging.getLogger(__name__)


class XlaWorker(Worker):
    """``Worker`` on torch-xla's device, cutting one graph per step and keeping its shapes static.

    Against ``Worker``: the KV pools are materialized at construction (else the first step's
    graph would also hold their zero fill and differ from the rest); the logits rows are
    padded to the bucket's sequence count (else each distinct number of sampled sequences
    would be a new graph); steps run under ``no_grad``, since torch-xla cannot take views
    of ordinary tensors under ``inference_mode``; and ``execute`` ends the step with one
    ``sync`` before reading the logits back. The model is moved to the XLA device.
    """

    def __init__(self, model: LlamaForCausalLM, config: EngineConfig, num_kv_blocks: int) -> None:
        if torch.device(config.device.device).type != "xla":
            raise ValueError(f"device={config.device.device!r}: XlaWorker runs on the 'xla' device")
        super().__init__(model.to(xla_device()), config, num_kv_blocks)
        sync()
        self._compiled_at_start = compile_count()
        self._is_warm = False

    def trace(self, step: StepInput) -> torch.Tensor:
        """Record one step (forward, KV writes, logits) without running it.

        Returns the pending fp32 logits [num_logits_rows(step), vocab_size]; rows past
        ``len(step.logits_indices)`` repeat row 0. Raises ``ValueError`` when the step is not
        padded to a bucket.
        """
        if step.num_padded_tokens is None or step.num_padded_seqs is None or step.max_blocks_per_seq is None:
            raise ValueError("an XLA step needs num_padded_tokens, num_padded_seqs and max_blocks_per_seq (a bucket)")
        row_padding = [0] * (num_logits_rows(step) - len(step.logits_indices))
        return self.forward(step, step.logits_indices + row_padding)

    def execute(self, step: StepInput) -> torch.Tensor:
        """Run one step as one graph; return its fp32 logits [len(step.logits_indices), vocab_size] on the CPU."""
        compiled_before = compile_count()
        logits = self.trace(step)
        sync()
        if self._is_warm and compile_count() > compiled_before:
            logger.warning(
                "compiled a new graph after warm-up for a step of %d tokens, %d sequences, %d logits rows: "
                "its shape is missing from the warm-up buckets",
                step.num_padded_tokens,
                step.num_padded_seqs,
                num_logits_rows(step),
            )
        # Slice on the host: slicing the device tensor by a varying length would be a new graph.
        return logits.cpu()[: len(step.logits_indices)]

    def num_compiled_graphs(self) -> int:
        return compile_count() - self._compiled_at_start

    def mark_warmed_up(self) -> None:
        self._is_warm = True


def num_logits_rows(step: StepInput) -> int:
    """Logits rows of a bucketed step's graph: one per sequence, or room for every token's row too.

    Sampling reads one row per sequence (padded to the bucket's count); prompt logprobs add
    up to one row per token. Padding to these two sizes gives a bucket at most two graphs,
    never one per row count. Raises ``ValueError`` for more rows than that.
    """
    assert step.num_padded_seqs is not None and step.num_padded_tokens is not None
    num_rows = len(step.logits_indices)
    if num_rows <= step.num_padded_seqs:
        return step.num_padded_seqs
    limit = step.num_padded_seqs + step.num_padded_tokens
    if num_rows > limit:
        raise ValueError(f"{num_rows} logits rows exceed the bucket's num_padded_seqs + num_padded_tokens={limit}")
    return limit

"""A worker on the XLA device: each engine step is exactly one graph of a bucket's shapes."""

from __future__ import annotations

import torch

from neuron_llm.config import EngineConfig
from neuron_llm.models.llama import LlamaForCausalLM
from neuron_llm.ops.metadata import AttentionMetadata
from neuron_llm.worker import StepInput, Worker
from neuron_llm.xla.device import sync, xla_device


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

    @torch.no_grad()
    def trace(self, step: StepInput) -> torch.Tensor:
        """Record one step (forward, KV writes, logits) without running it.

        Returns the pending fp32 logits [step.num_padded_seqs, vocab_size]; rows past
        ``len(step.logits_indices)`` repeat row 0. Raises ``ValueError`` when the step is not
        padded to a bucket.
        """
        num_tokens, num_seqs = step.num_padded_tokens, step.num_padded_seqs
        if num_tokens is None or num_seqs is None or step.max_blocks_per_seq is None:
            raise ValueError("an XLA step needs num_padded_tokens, num_padded_seqs and max_blocks_per_seq (a bucket)")
        num_rows = len(step.logits_indices)
        if num_rows > num_seqs:
            raise ValueError(f"{num_rows} logits rows exceed the bucket's num_padded_seqs={num_seqs}")
        padding = [0] * (num_tokens - len(step.input_ids))
        input_ids = torch.tensor(step.input_ids + padding, dtype=torch.int64, device=self.device)
        positions = torch.tensor(step.positions + padding, dtype=torch.int64, device=self.device)
        metadata = AttentionMetadata.build(
            step.query_lens,
            step.seq_lens,
            step.block_tables,
            self.block_size,
            self.device,
            num_padded_tokens=num_tokens,
            num_padded_seqs=num_seqs,
            max_blocks_per_seq=step.max_blocks_per_seq,
        )
        hidden = self.model(input_ids, positions, self.kv_caches, metadata)
        rows = torch.tensor(step.logits_indices + [0] * (num_seqs - num_rows), dtype=torch.int64, device=self.device)
        return self.model.compute_logits(hidden.index_select(0, rows))

    def execute(self, step: StepInput) -> torch.Tensor:
        """Run one step as one graph; return its fp32 logits [len(step.logits_indices), vocab_size] on the CPU."""
        logits = self.trace(step)
        sync()
        # Slice on the host: slicing the device tensor by a varying length would be a new graph.
        return logits.cpu()[: len(step.logits_indices)]

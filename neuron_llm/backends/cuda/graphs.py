"""Decode steps replayed from CUDA graphs, one graph per decode bucket.

A decode step of a small batch launches a few hundred kernels that each run for microseconds;
launched one by one from Python, the gaps between them cost more than the kernels. A graph
records the whole forward (embedding to logits) once per bucket shape and replays it with one
launch. What changes between steps (token ids, positions, slots, block tables, lengths) is
copied into the graph's own input tensors first; everything the graph reads is a tensor of
fixed shape, which is why the attention kernels launch from shapes alone.

Prefill steps, and any step outside the decode buckets, run eagerly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from neuron_llm.config import EngineConfig
from neuron_llm.models.llama import LlamaForCausalLM
from neuron_llm.ops.metadata import NULL_BLOCK_ID, AttentionMetadata
from neuron_llm.worker import StepInput, Worker, fill_placeholders

logger = logging.getLogger(__name__)


@dataclass
class _DecodeGraph:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]
    """The graph's input tensors on the device, by name."""
    staging: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]
    """Two sets of pinned host tensors of the same shapes: filled on the host, copied without a sync."""
    logits: torch.Tensor
    """[num_seqs, vocab] fp32, written by every replay: the rows ``logits_indices`` names, padded with row 0."""
    num_staged: int = 0


class CudaGraphWorker(Worker):
    """``Worker`` that replays decode steps padded to a bucket from CUDA graphs.

    A graph is captured the first time its bucket is seen (``ModelRunner.warm_up`` sees them
    all at start). Captures share one memory pool, largest bucket first as warm-up runs them.
    """

    def __init__(self, model: LlamaForCausalLM, config: EngineConfig, num_kv_blocks: int) -> None:
        super().__init__(model, config, num_kv_blocks)
        if self.device.type != "cuda":
            raise ValueError(f"device={config.device.device!r}: CUDA graphs need a CUDA device")
        self._graphs: dict[tuple[int, int], _DecodeGraph] = {}
        self._pool = torch.cuda.graph_pool_handle()

    def num_compiled_graphs(self) -> int:
        return len(self._graphs)

    @torch.no_grad()
    def forward(
        self, step: StepInput, logits_indices: list[int], sampled_before: torch.Tensor | None = None
    ) -> torch.Tensor:
        num_seqs = step.num_padded_seqs
        if not _is_padded_decode(step) or len(logits_indices) > len(step.input_ids):
            return super().forward(step, logits_indices, sampled_before)
        assert num_seqs is not None and step.max_blocks_per_seq is not None
        key = (num_seqs, step.max_blocks_per_seq)
        graph = self._graphs.get(key) or self._capture(*key)
        # Two sets of host buffers, used in turn: with async scheduling this step is staged
        # while the copy of the previous step's inputs may still be queued.
        staging = graph.staging[graph.num_staged % 2]
        graph.num_staged += 1
        _stage(staging, step, logits_indices, self.block_size)
        for name, tensor in graph.inputs.items():
            tensor.copy_(staging[name], non_blocking=True)
        if sampled_before is not None:
            ids = graph.inputs["input_ids"]
            ids.copy_(fill_placeholders(ids, sampled_before))
        graph.graph.replay()
        return graph.logits[: len(logits_indices)]

    def _capture(self, num_seqs: int, width: int) -> _DecodeGraph:
        inputs = {
            "input_ids": torch.zeros(num_seqs, dtype=torch.int64, device=self.device),
            "positions": torch.zeros(num_seqs, dtype=torch.int64, device=self.device),
            "slot_mapping": torch.zeros(num_seqs, dtype=torch.int64, device=self.device),
            "block_tables": torch.full((num_seqs, width), NULL_BLOCK_ID, dtype=torch.int32, device=self.device),
            "seq_lens": torch.zeros(num_seqs, dtype=torch.int32, device=self.device),
            "query_start_loc": torch.zeros(num_seqs + 1, dtype=torch.int32, device=self.device),
            "logits_indices": torch.zeros(num_seqs, dtype=torch.int64, device=self.device),
        }
        staging = tuple(
            {name: torch.empty_like(t, device="cpu").pin_memory() for name, t in inputs.items()} for _ in range(2)
        )
        metadata = AttentionMetadata(
            slot_mapping=inputs["slot_mapping"],
            block_tables=inputs["block_tables"],
            seq_lens=inputs["seq_lens"],
            query_start_loc=inputs["query_start_loc"],
            # Host lists are not read on this path (the cuda backend's decode kernel reads
            # tensors only); they describe the capture's all-padding batch.
            seq_lens_host=[0] * num_seqs,
            query_start_loc_host=[0] * (num_seqs + 1),
            is_decode=True,
        )

        def run() -> torch.Tensor:
            hidden = self.model(inputs["input_ids"], inputs["positions"], self.kv_caches, metadata)
            return self.model.compute_logits(hidden.index_select(0, inputs["logits_indices"]))

        # Warm up on a side stream (Triton compiles its kernels on first launch, which a
        # capture cannot contain), then record.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = run()
        logger.debug("captured the decode graph of %d sequences, block tables %d wide", num_seqs, width)
        captured = _DecodeGraph(graph, inputs, staging, logits)
        self._graphs[(num_seqs, width)] = captured
        return captured


def _is_padded_decode(step: StepInput) -> bool:
    return (
        step.num_padded_seqs is not None
        and step.num_padded_tokens == step.num_padded_seqs
        and step.max_blocks_per_seq is not None
        and all(query_len == 1 for query_len in step.query_lens)
    )


def _stage(staging: dict[str, torch.Tensor], step: StepInput, logits_indices: list[int], block_size: int) -> None:
    """Write ``step``'s decode inputs into the pinned host tensors, padding included.

    Padding sequences get an empty context and write their (ignored) K/V to the null block.
    """
    num_real = len(step.input_ids)
    ids, positions, slots = (staging[name].numpy() for name in ("input_ids", "positions", "slot_mapping"))
    tables, lens, starts = (staging[name].numpy() for name in ("block_tables", "seq_lens", "query_start_loc"))
    ids[:num_real] = step.input_ids
    ids[num_real:] = 0
    positions[:num_real] = step.positions
    positions[num_real:] = 0
    tables.fill(NULL_BLOCK_ID)
    for row, table in enumerate(step.block_tables):
        tables[row, : len(table)] = table
    real_positions = positions[:num_real]
    slots[:num_real] = (
        tables[np.arange(num_real), real_positions // block_size] * block_size + real_positions % block_size
    )
    slots[num_real:] = NULL_BLOCK_ID * block_size
    lens[:num_real] = step.seq_lens
    lens[num_real:] = 0
    starts[: num_real + 1] = np.arange(num_real + 1)
    starts[num_real + 1 :] = num_real
    rows = staging["logits_indices"].numpy()
    rows[: len(logits_indices)] = logits_indices
    rows[len(logits_indices) :] = 0

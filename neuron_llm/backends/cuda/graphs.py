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
import math
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from neuron_llm.config import EngineConfig
from neuron_llm.models.llama import LlamaForCausalLM
from neuron_llm.ops.metadata import NULL_BLOCK_ID, AttentionMetadata
from neuron_llm.worker import StepInput, Worker

logger = logging.getLogger(__name__)


@dataclass
class _DecodeGraph:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]
    """The graph's input tensors on the device, by name: views of ``packed``."""
    packed: torch.Tensor
    """Every input's bytes in one device buffer, so that a step's inputs cross in one copy."""
    staging: list[tuple[torch.Tensor, dict[str, torch.Tensor]]]
    """Two pinned host buffers like ``packed``, each with its views like ``inputs``."""
    logits: torch.Tensor
    """[num_seqs, vocab] fp32, written by every replay: the rows ``logits_indices`` names, padded with row 0."""
    num_staged: int = 0


def _packed_tensors(
    shapes: dict[str, tuple[tuple[int, ...], torch.dtype]], device: torch.device | str, pin: bool = False
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One byte buffer, and a typed view of it for each ``name: (shape, dtype)`` (16-byte aligned)."""
    offsets, size = {}, 0
    for name, (shape, dtype) in shapes.items():
        offsets[name] = size
        size += -(-math.prod(shape) * dtype.itemsize // 16) * 16
    buffer = torch.zeros(size, dtype=torch.uint8, device=device, pin_memory=pin)
    views = {
        name: buffer[offsets[name] : offsets[name] + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
        for name, (shape, dtype) in shapes.items()
    }
    return buffer, views


@triton.jit
def _fill_placeholders_kernel(ids_ptr, sampled_ptr, num_ids, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    ids = tl.load(ids_ptr + offsets, mask=offsets < num_ids)
    is_placeholder = ids < 0
    sampled = tl.load(sampled_ptr + (-1 - ids), mask=(offsets < num_ids) & is_placeholder)
    tl.store(ids_ptr + offsets, sampled, mask=(offsets < num_ids) & is_placeholder)


def _fill_placeholders_in_place(ids: torch.Tensor, sampled_before: torch.Tensor) -> None:
    """``fill_placeholders`` into ``ids`` itself, in one kernel (torch's ops take five)."""
    assert ids.is_contiguous() and sampled_before.is_contiguous() and sampled_before.dtype == ids.dtype
    _fill_placeholders_kernel[(1,)](ids, sampled_before, ids.numel(), BLOCK=triton.next_power_of_2(ids.numel()))


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
        if not _replays_a_graph(step, logits_indices):
            return super().forward(step, logits_indices, sampled_before)
        assert step.num_padded_seqs is not None and step.max_blocks_per_seq is not None
        key = (step.num_padded_seqs, step.max_blocks_per_seq)
        graph = self._graphs.get(key) or self._capture(*key)
        # Two sets of host buffers, used in turn: with async scheduling this step is staged
        # while the copy of the previous step's inputs may still be queued.
        staging, views = graph.staging[graph.num_staged % 2]
        graph.num_staged += 1
        _stage(views, step, logits_indices, self.block_size)
        graph.packed.copy_(staging, non_blocking=True)
        if sampled_before is not None:
            _fill_placeholders_in_place(graph.inputs["input_ids"], sampled_before)
        graph.graph.replay()
        return graph.logits[: len(logits_indices)]

    def _capture(self, num_seqs: int, width: int) -> _DecodeGraph:
        shapes = {
            "input_ids": ((num_seqs,), torch.int64),
            "positions": ((num_seqs,), torch.int64),
            "slot_mapping": ((num_seqs,), torch.int64),
            "logits_indices": ((num_seqs,), torch.int64),
            "block_tables": ((num_seqs, width), torch.int32),
            "seq_lens": ((num_seqs,), torch.int32),
            "query_start_loc": ((num_seqs + 1,), torch.int32),
        }
        packed, inputs = _packed_tensors(shapes, self.device)
        inputs["block_tables"].fill_(NULL_BLOCK_ID)
        staging = [_packed_tensors(shapes, "cpu", pin=True) for _ in range(2)]
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
        captured = _DecodeGraph(graph, inputs, packed, staging, logits)
        self._graphs[(num_seqs, width)] = captured
        return captured


def _replays_a_graph(step: StepInput, logits_indices: list[int]) -> bool:
    """Whether ``step`` is a decode step padded to a bucket whose graph computes its logits rows:
    one row per padded sequence at most (prompt logprob rows beyond those run eagerly)."""
    return (
        step.num_padded_seqs is not None
        and step.num_padded_tokens == step.num_padded_seqs
        and step.max_blocks_per_seq is not None
        and all(query_len == 1 for query_len in step.query_lens)
        and len(logits_indices) <= step.num_padded_seqs
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

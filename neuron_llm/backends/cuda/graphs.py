"""Steps replayed from CUDA graphs, one graph per bucket (two for long prefill buckets).

A step of few tokens launches a few hundred kernels that each run for microseconds; launched
one by one from Python, the gaps between them cost more than the kernels. A graph records the
whole forward (embedding to logits) once per bucket shape and replays it with one launch.
What changes between steps (token ids, positions, slots, block tables, lengths) is copied
into the graph's own input tensors first; everything the graph reads is a tensor of fixed
shape, which is why the attention kernels launch from shapes alone.

Every decode bucket has a graph, and so does every prefill bucket (prompts, chunks, mixed
steps) of at most ``DeviceConfig.max_prefill_graph_tokens`` tokens: an eager prefill of a few
hundred tokens spends more time launching kernels than running them (BENCHMARKS.md). Longer
prefill steps run eagerly, as do steps that return prompt logits.

A prefill bucket of ``CUDNN_MIN_PROMPT`` tokens or more (that a block table holds) has a
second graph, for a step that is one whole prompt of that many tokens or more: its attention
is cuDNN's over the bucket's length, as an eager step's would be, where the other graph runs
the paged kernel (slower on a long fresh prompt). The padding tokens after the prompt then
attend to it like prompt tokens, and the prompt's rows come out bit for bit as eagerly; no row
reads the padding's.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from neuron_llm.backends import Backend
from neuron_llm.backends.cuda.backend import takes_whole_prompt
from neuron_llm.config import EngineConfig
from neuron_llm.models.llama import LlamaForCausalLM
from neuron_llm.ops.metadata import NULL_BLOCK_ID, AttentionMetadata, write_host_arrays
from neuron_llm.worker import StepInput, Worker, on_own_backend_and_device

logger = logging.getLogger(__name__)


DECODE, PREFILL, WHOLE_PROMPT = "decode", "prefill", "whole_prompt"
"""Graph kinds: a decode bucket's; a prefill bucket's for any step; for one whole prompt."""


@dataclass
class _StepGraph:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]
    """The graph's input tensors on the device, by name: views of ``packed``."""
    packed: torch.Tensor
    """Every input's bytes in one device buffer, so that a step's inputs cross in one copy."""
    staging: list[tuple[torch.Tensor, dict[str, torch.Tensor], torch.cuda.Event]]
    """Two pinned host buffers like ``packed``, each with its views like ``inputs`` and the
    event recorded after its latest copy to the device."""
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
    """``Worker`` that replays steps padded to a bucket from CUDA graphs.

    A graph is captured the first time its bucket is seen (``ModelRunner.warm_up`` sees them
    all at start). Captures share one memory pool, as graphs never run at once.
    """

    def __init__(
        self, model: LlamaForCausalLM, config: EngineConfig, num_kv_blocks: int, backend: Backend | None = None
    ) -> None:
        super().__init__(model, config, num_kv_blocks, backend)
        if self.device.type != "cuda":
            raise ValueError(f"device={config.device.device!r}: CUDA graphs need a CUDA device")
        self.max_prefill_graph_tokens = config.device.max_prefill_graph_tokens
        self._graphs: dict[tuple[str, int, int, int], _StepGraph] = {}
        self._pool = torch.cuda.graph_pool_handle()
        self._is_warm = False
        self._prefill_logits: dict[int, torch.Tensor] = {}
        """One logits buffer for the prefill graphs of each row count (all have ``max_num_seqs``
        rows): a graph's own would hold rows x vocab fp32 (33 MB at 64 rows of 128,256) for the
        engine's life, once per token bucket."""

    def num_compiled_graphs(self) -> int:
        return len(self._graphs)

    def mark_warmed_up(self) -> None:
        self._is_warm = True

    def close(self, wait: bool) -> None:
        # Destroying a process group while graphs holding its NCCL kernels live can hang
        # (pytorch/pytorch#115388).
        if wait:
            torch.cuda.synchronize(self.device)
        self._graphs.clear()
        self._prefill_logits.clear()

    @on_own_backend_and_device
    @torch.no_grad()
    def forward(
        self, step: StepInput, logits_indices: list[int], sampled_before: torch.Tensor | None = None
    ) -> torch.Tensor:
        """As ``Worker.forward``; the logits returned from a graph are its output buffer, which
        the next step's replay overwrites (the engine samples them first, on the same stream)."""
        if not _replays_a_graph(step, logits_indices, self.max_prefill_graph_tokens):
            return super().forward(step, logits_indices, sampled_before)
        assert step.num_padded_tokens is not None and step.num_padded_seqs is not None
        assert step.max_blocks_per_seq is not None
        shape = (step.num_padded_tokens, step.num_padded_seqs, step.max_blocks_per_seq)
        dtype = self.config.device.dtype
        kind = _graph_kind(step, self.block_size, dtype)
        if (kind, *shape) not in self._graphs:
            # A bucket's first step captures every graph its steps may take, so that warm-up
            # (one step a bucket) leaves none to capture while serving.
            kinds = [DECODE] if kind == DECODE else _prefill_kinds(shape[0], shape[2], self.block_size, dtype)
            if self._is_warm:
                logger.warning(
                    "capturing CUDA graphs after warm-up for a bucket of %d tokens, %d sequences, block tables "
                    "%d wide: warm-up should have captured every bucket's; this step waits for the capture",
                    *shape,
                )
            for other in kinds:
                self._capture(other, *shape)
        graph = self._graphs[(kind, *shape)]
        # Two sets of host buffers, used in turn: with async scheduling this step is staged
        # while the copy of the previous step's inputs may still be queued. Steps that sample
        # nothing (chunks of a long prompt) never make the host wait for the device, so the
        # host may come back to a buffer before its copy ran: then it waits for that copy.
        staging, views, copied = graph.staging[graph.num_staged % 2]
        graph.num_staged += 1
        copied.synchronize()
        _stage(views, step, logits_indices, self.block_size)
        graph.packed.copy_(staging, non_blocking=True)
        copied.record()
        if sampled_before is not None:
            _fill_placeholders_in_place(graph.inputs["input_ids"], sampled_before)
        graph.graph.replay()
        return graph.logits[: len(logits_indices)]

    def _capture(self, kind: str, num_tokens: int, num_seqs: int, width: int) -> None:
        shapes = {
            "input_ids": ((num_tokens,), torch.int64),
            "positions": ((num_tokens,), torch.int64),
            "slot_mapping": ((num_tokens,), torch.int64),
            "logits_indices": ((num_seqs,), torch.int64),
            "block_tables": ((num_seqs, width), torch.int32),
            "seq_lens": ((num_seqs,), torch.int32),
            "query_start_loc": ((num_seqs + 1,), torch.int32),
        }
        packed, inputs = _packed_tensors(shapes, self.device)
        inputs["block_tables"].fill_(NULL_BLOCK_ID)
        staging = [(*_packed_tensors(shapes, "cpu", pin=True), torch.cuda.Event()) for _ in range(2)]
        # The host lists hold for no replay: the cuda backend reads them only to send a long
        # whole prompt to cuDNN (a whole-prompt graph's: one prompt of every token) and to
        # order the prefill kernel's programs (heads first with all zeros).
        first_len = num_tokens if kind == WHOLE_PROMPT else 0
        metadata = AttentionMetadata(
            slot_mapping=inputs["slot_mapping"],
            block_tables=inputs["block_tables"],
            seq_lens=inputs["seq_lens"],
            query_start_loc=inputs["query_start_loc"],
            seq_lens_host=[first_len] + [0] * (num_seqs - 1),
            query_start_loc_host=[0] + [first_len] * num_seqs,
            is_decode=kind == DECODE,
        )

        out = None
        if kind != DECODE:
            shape = (num_seqs, self.config.model.vocab_size)
            out = self._prefill_logits.setdefault(num_seqs, torch.empty(shape, dtype=torch.float32, device=self.device))

        def run() -> torch.Tensor:
            hidden = self.model(inputs["input_ids"], inputs["positions"], self.kv_caches, metadata)
            return self.model.compute_logits(hidden.index_select(0, inputs["logits_indices"]), out)

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
        logger.debug(
            "captured the %s graph of %d tokens, %d sequences, block tables %d wide", kind, num_tokens, num_seqs, width
        )
        self._graphs[(kind, num_tokens, num_seqs, width)] = _StepGraph(graph, inputs, packed, staging, logits)


def _is_decode(step: StepInput) -> bool:
    """One token per sequence, token ``s`` of sequence ``s``: what the decode attention kernel takes."""
    return step.num_padded_tokens == step.num_padded_seqs and all(query_len == 1 for query_len in step.query_lens)


def _prefill_kinds(num_tokens: int, width: int, block_size: int, dtype: torch.dtype) -> list[str]:
    """The graphs of a prefill bucket of ``num_tokens`` tokens and block tables ``width`` wide:
    the general one, and one for a whole prompt where cuDNN takes it and it fits a block table."""
    whole = takes_whole_prompt(num_tokens, dtype) and num_tokens <= width * block_size
    return [PREFILL, WHOLE_PROMPT] if whole else [PREFILL]


def _graph_kind(step: StepInput, block_size: int, dtype: torch.dtype) -> str:
    """Which of its bucket's graphs ``step`` replays."""
    if _is_decode(step):
        return DECODE
    assert step.num_padded_tokens is not None and step.max_blocks_per_seq is not None
    # By the prompt's own length, as an eager step chooses: a shorter prompt padded to a long
    # bucket takes the paged kernel, as it would eagerly.
    is_whole_prompt = (
        len(step.query_lens) == 1 and step.query_lens == step.seq_lens and takes_whole_prompt(step.seq_lens[0], dtype)
    )
    kinds = _prefill_kinds(step.num_padded_tokens, step.max_blocks_per_seq, block_size, dtype)
    return WHOLE_PROMPT if is_whole_prompt and WHOLE_PROMPT in kinds else PREFILL


def _replays_a_graph(step: StepInput, logits_indices: list[int], max_prefill_tokens: int) -> bool:
    """Whether ``step`` is padded to a bucket whose graph computes its logits rows: a decode
    bucket, or a prefill one of at most ``max_prefill_tokens`` tokens; one row per padded
    sequence at most (prompt logprob rows beyond those run eagerly)."""
    return (
        step.num_padded_tokens is not None
        and step.num_padded_seqs is not None
        and step.max_blocks_per_seq is not None
        and (_is_decode(step) or step.num_padded_tokens <= max_prefill_tokens)
        and len(logits_indices) <= step.num_padded_seqs
    )


def _stage(staging: dict[str, torch.Tensor], step: StepInput, logits_indices: list[int], block_size: int) -> None:
    """Write ``step``'s inputs into the pinned host tensors, padding included (padding tokens
    are token 0 at position 0, and write to the null block)."""
    num_tokens = len(step.input_ids)
    ids, positions, rows = (staging[name].numpy() for name in ("input_ids", "positions", "logits_indices"))
    ids[:num_tokens] = step.input_ids
    ids[num_tokens:] = 0
    positions[:num_tokens] = step.positions
    positions[num_tokens:] = 0
    rows[: len(logits_indices)] = logits_indices
    rows[len(logits_indices) :] = 0
    arrays = (staging[name].numpy() for name in ("slot_mapping", "block_tables", "seq_lens", "query_start_loc"))
    write_host_arrays(step.query_lens, step.seq_lens, step.block_tables, block_size, *arrays)

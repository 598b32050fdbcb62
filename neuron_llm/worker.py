"""One device's share of the work: its model shard, its KV pool, and running a step.

The engine (on rank 0) describes each step as a ``StepInput`` of plain lists; with tensor
parallelism every rank receives the same ``StepInput`` and runs the same forward on its
shard, and the vocabulary-parallel LM head gathers full logits.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from neuron_llm import ops
from neuron_llm.backends import Backend, get_backend
from neuron_llm.config import EngineConfig, ModelConfig
from neuron_llm.loader import LoadedModel
from neuron_llm.models.llama import KVCache, LlamaForCausalLM
from neuron_llm.ops.metadata import AttentionMetadata
from neuron_llm.sample import RowState, SamplerOutput, SamplingBatch, sample
from neuron_llm.sample.rejection import verify
from neuron_llm.transfer import to_device


@dataclass
class StepInput:
    """One engine step's flat batch, as plain lists (cheap to send to other ranks)."""

    input_ids: list[int]
    positions: list[int]
    query_lens: list[int]
    """Tokens computed this step per sequence; their sum is len(input_ids) before padding."""
    seq_lens: list[int]
    """Context length per sequence after this step."""
    block_tables: list[list[int]]
    logits_indices: list[int]
    """Rows of the flat batch whose logits are returned: each sampling sequence's last token
    (with proposals to verify, each proposal's row before it), padded to ``num_padded_seqs``
    rows when set, then any prompt rows."""
    num_padded_tokens: int | None = None
    num_padded_seqs: int | None = None
    max_blocks_per_seq: int | None = None
    num_sampled_before: int = 0
    """With tensor parallelism, the length of the previous step's sampled ids that rank 0 sends
    the other ranks after this step, for its placeholder input ids; 0: none."""


@dataclass
class StepOutput:
    """What rank 0 hands back from a step: its sampled tokens and the logits rows after them."""

    sampled: SamplerOutput | None
    """One token per sampling row (host tensors on a graph device); None when no row samples."""
    prompt_logits: torch.Tensor
    """[rows, vocab] fp32: the logits rows after the sampling rows (prompt logprobs); often 0 rows."""


def placeholder(row: int) -> int:
    """The input id standing for row ``row`` of the token ids the previous step sampled.

    With async scheduling a step is packed before the host has read what the step before it
    sampled; the device fills these ids in (``fill_placeholders``). Real ids are >= 0.
    """
    return -1 - row


def fill_placeholders(input_ids: torch.Tensor, sampled_before: torch.Tensor) -> torch.Tensor:
    """``input_ids`` with every ``placeholder(r)`` replaced by ``sampled_before[r]``, on the device."""
    rows = (-1 - input_ids).clamp_min(0)
    return torch.where(input_ids < 0, sampled_before[rows], input_ids)


def num_kv_heads_per_rank(config: ModelConfig, tensor_parallel_size: int) -> int:
    """KV heads are split across ranks, or replicated (one per rank) when TP exceeds them."""
    return max(1, config.num_key_value_heads // tensor_parallel_size)


def kv_block_bytes(config: ModelConfig, block_size: int, num_kv_heads: int, dtype: torch.dtype) -> int:
    """Bytes of one KV block across all layers (K and V)."""
    element_size = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * block_size * num_kv_heads * config.head_dim * element_size


def allocate_kv_cache(
    config: ModelConfig,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> list[KVCache]:
    """Per-layer (key, value) pools, each [num_blocks, block_size, num_kv_heads, head_dim]."""
    shape = (num_blocks, block_size, num_kv_heads, config.head_dim)
    return [
        (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(config.num_hidden_layers)
    ]


CPU_KV_CACHE_BYTES = 4 << 30
"""Default KV pool on the CPU (as vLLM's VLLM_CPU_KVCACHE_SPACE): host memory is shared with everything else."""


def size_kv_pool(config: EngineConfig, weight_bytes: int) -> int:
    """KV blocks per layer: ``num_kv_blocks`` if set, else what memory allows, capped at need.

    On CUDA the pool takes ``memory_fraction`` of the device memory minus what is in use
    (the weights); on the CPU it takes at most ``CPU_KV_CACHE_BYTES`` and ``memory_fraction``
    of the host memory left after the weights (``weight_bytes`` is this rank's shard), shared
    by all tensor-parallel ranks, which run on that one host. It never exceeds what
    ``max_num_seqs`` sequences of ``max_model_len`` tokens need, plus the null block.
    """
    cache = config.cache
    if cache.num_kv_blocks is not None:
        return cache.num_kv_blocks
    num_kv_heads = num_kv_heads_per_rank(config.model, config.parallel.tensor_parallel_size)
    block_bytes = kv_block_bytes(config.model, cache.block_size, num_kv_heads, config.device.dtype)
    device = torch.device(config.device.device)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = int(total * cache.memory_fraction) - (total - free)
    else:
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        num_ranks = config.parallel.tensor_parallel_size
        budget = min(CPU_KV_CACHE_BYTES, int(host * cache.memory_fraction) - weight_bytes * num_ranks) // num_ranks
    needed = config.scheduler.max_num_seqs * -(-config.max_model_len // cache.block_size) + 1
    num_blocks = min(needed, budget // block_bytes)
    if num_blocks < 2:
        raise ValueError(
            f"no memory left for the KV cache ({budget} bytes after the weights, {block_bytes} per block); "
            "lower max_model_len or raise memory_fraction"
        )
    return num_blocks


def load_worker(
    model: str,
    config: EngineConfig,
    rank: int,
    world_size: int,
    on_loaded: Callable[[LoadedModel, EngineConfig, int, int], None] | None = None,
) -> Worker:
    """Rank ``rank``'s Worker: its shard of ``model`` loaded onto ``config.device``, and its KV pool.

    The ``WorkerFactory`` of ``neuron_llm.parallel.executor`` (bind ``model`` with ``partial``).
    ``model`` may be a compiled artifact (``neuron_llm.compile.artifact``): its rank's saved
    parameters are copied in as they are. ``on_loaded(loaded, config, rank, world_size)`` sees
    the loaded model before the backend rewrites it (what ``neuron-llm compile`` saves).
    """
    from neuron_llm.compile import artifact
    from neuron_llm.parallel.plan import shard_model
    from neuron_llm.quant.loading import load_any_format

    on_xla = torch.device(config.device.device).type == "xla"
    if on_xla:
        from neuron_llm.xla.device import import_torch_xla

        import_torch_xla()  # before minutes of loading, not after
        if config.parallel.tensor_parallel_size > 1:
            from neuron_llm.xla import spmd

            spmd.make_mesh(config.parallel.tensor_parallel_size)  # checks the devices, before loading
    # Weights are read on the host and moved to the XLA device once.
    device = "cpu" if on_xla else config.device.device
    if artifact.is_artifact(model):
        built = artifact.load_artifact_model(model, config, rank, world_size, device)
        if on_xla:
            artifact.check_graphs(built, config, model)
        return make_worker(built, config)
    shard = functools.partial(shard_model, rank=rank, world_size=world_size) if world_size > 1 else None
    loaded = load_any_format(
        model, dtype=config.device.dtype, device=device, quantization=config.quantization, shard=shard
    )
    if on_loaded is not None:
        on_loaded(loaded, config, rank, world_size)
    return make_worker(loaded.model, config)


def make_worker(model: LlamaForCausalLM, config: EngineConfig) -> Worker:
    """The Worker that runs the loaded ``model`` on ``config.device`` with its backend, and its KV pool.

    Lets ``config.device``'s backend rewrite the model into its fastest form; the worker's
    steps dispatch to that backend. On CUDA with the cuda backend, steps replay CUDA graphs
    unless ``enforce_eager`` (``CudaGraphWorker``).
    """
    device = torch.device(config.device.device)
    if device.type == "cuda" and device.index is not None:
        # Loading and sizing the KV pool run on the current device too (steps set their own).
        torch.cuda.set_device(device)
    backend = get_backend(config.device.backend_name, config.device.nki_kernels)
    backend.prepare_model(model)
    if device.type == "xla":
        from neuron_llm.xla.runner import XlaWorker

        assert config.cache.num_kv_blocks is not None, "LLM refuses the XLA device without num_kv_blocks"
        return XlaWorker(model, config, config.cache.num_kv_blocks, backend)
    num_kv_blocks = size_kv_pool(config, model.weight_bytes())
    if backend.name == "cuda" and not config.device.enforce_eager:
        from neuron_llm.backends.cuda.graphs import CudaGraphWorker

        return CudaGraphWorker(model, config, num_kv_blocks, backend)
    return Worker(model, config, num_kv_blocks, backend)


Method = TypeVar("Method", bound=Callable[..., Any])


def on_own_backend_and_device(method: Method) -> Method:
    """Run a worker's method with the ops dispatching to the worker's backend and, on CUDA, its
    device current: whichever thread calls (a server's engine thread starts on cuda:0), Triton
    launches, graph captures and replays must go to the model's device."""

    @functools.wraps(method)
    def run(self: Worker, *args: Any, **kwargs: Any) -> Any:
        on_device = torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
        with ops.using_backend(self.backend), on_device:
            return method(self, *args, **kwargs)

    return run  # type: ignore[return-value]


class Worker:
    """Runs steps of ``model`` over its paged KV pool on one device."""

    pads_to_bucket = False
    """Whether a step runs padded to its bucket's tokens (every forward of a graph compiler
    must have one of the buckets' shapes); eagerly, padding would only add work: a step of
    2,100 tokens would compute 4,096 rows."""

    def __init__(
        self, model: LlamaForCausalLM, config: EngineConfig, num_kv_blocks: int, backend: Backend | None = None
    ) -> None:
        self.model = model
        self.config = config
        if backend is None:
            backend = get_backend(config.device.backend_name, config.device.nki_kernels)
        self.backend = backend
        """Where this worker's ops go (each engine its own, whatever another one in the process uses)."""
        self.device = torch.device(config.device.device)
        if self.device.type == "cuda" and self.device.index is None:
            # Pinned now: "cuda" alone would mean whichever GPU is current in the calling thread.
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.block_size = config.cache.block_size
        self.num_kv_blocks = num_kv_blocks
        self.weight_bytes = model.weight_bytes()
        """Bytes of this rank's parameters as stored (quantized ones in 8 bits, with their scales)."""
        self.decode_read_bytes = model.decode_read_bytes()
        """Of those, the bytes a decode step of one sequence reads (one row of the embedding)."""
        self.kv_caches = allocate_kv_cache(
            config.model, num_kv_blocks, self.block_size, self.num_kv_heads(), config.device.dtype, self.device
        )

    def num_kv_heads(self) -> int:
        """KV heads this worker's pools hold: its rank's share."""
        return num_kv_heads_per_rank(self.config.model, self.config.parallel.tensor_parallel_size)

    def execute(self, step: StepInput, sampled_before: torch.Tensor | None = None) -> torch.Tensor:
        """Run one flat batch; return fp32 logits [len(step.logits_indices), vocab_size].

        ``sampled_before`` fills placeholder input ids (see ``execute_and_sample``).
        """
        return self.forward(step, step.logits_indices, sampled_before)

    @on_own_backend_and_device
    def execute_and_sample(
        self,
        step: StepInput,
        rows: Sequence[RowState],
        eos_token_ids: Sequence[int] = (),
        sampled_before: torch.Tensor | None = None,
        draft_token_ids: Sequence[Sequence[int]] | None = None,
    ) -> StepOutput:
        """Run one flat batch and sample ``rows`` (one per sampling sequence, in order) on this device.

        Each sampling sequence has one logits row, in order: row ``i`` is ``rows[i]``'s. With
        ``draft_token_ids`` (per sequence, the proposals the step computed after its last
        token) sequence ``i`` has one row per proposal plus one, and they are verified
        (``neuron_llm.sample.rejection``). The logits rows past the sampling ones (padded to
        ``step.num_padded_seqs`` when set) come back as ``prompt_logits``. ``eos_token_ids``
        are held back from rows short of min_tokens. Input ids that are ``placeholder(r)``
        take row ``r`` of ``sampled_before`` (the token ids the previous step sampled, still
        on this device).
        """
        logits = self.execute(step, sampled_before)
        drafts = draft_token_ids if draft_token_ids is not None and any(draft_token_ids) else None
        num_rows = len(rows) + (sum(map(len, drafts)) if drafts is not None else 0)
        sampled = None
        if drafts is not None:
            sampled = verify(logits[:num_rows], rows, drafts, eos_token_ids)
        elif rows:
            batch = SamplingBatch.build(rows, logits.shape[-1], logits.device, eos_token_ids)
            sampled = sample(logits[:num_rows], batch)
        return StepOutput(sampled, logits[max(step.num_padded_seqs or 0, num_rows) :])

    def num_compiled_graphs(self) -> int:
        """Graphs compiled so far; eager execution compiles none."""
        return 0

    def mark_warmed_up(self) -> None:
        """Every bucket has run once; from now on a new graph is worth a warning."""

    def watch_compile_cache(self, cache: Path) -> None:
        """From now on, name in a warning each file a step's compile adds to ``cache``, an
        artifact's: a graph the artifact lacked (one found there compiles nothing new)."""

    def close(self, wait: bool) -> None:
        """Drop what the steps hold beyond the weights and the KV pool, before the process group
        is destroyed; ``wait``: first let the queued work finish (not after a failure, when a
        collective may never end)."""

    # no_grad rather than inference_mode: torch-xla cannot take views of inference tensors.
    @on_own_backend_and_device
    @torch.no_grad()
    def forward(
        self, step: StepInput, logits_indices: list[int], sampled_before: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run ``step``; return the (possibly pending) fp32 logits of rows ``logits_indices``.

        ``sampled_before`` fills placeholder input ids (see ``execute_and_sample``).
        """
        num_tokens = step.num_padded_tokens if self.pads_to_bucket and step.num_padded_tokens else len(step.input_ids)
        padding = num_tokens - len(step.input_ids)
        input_ids = to_device(step.input_ids + [0] * padding, torch.int64, self.device)
        if sampled_before is not None:
            input_ids = fill_placeholders(input_ids, sampled_before)
        positions = to_device(step.positions + [0] * padding, torch.int64, self.device)
        metadata = AttentionMetadata.build(
            step.query_lens,
            step.seq_lens,
            step.block_tables,
            self.block_size,
            self.device,
            num_padded_tokens=num_tokens,
            num_padded_seqs=step.num_padded_seqs,
            max_blocks_per_seq=step.max_blocks_per_seq,
        )
        hidden = self.model(input_ids, positions, self.kv_caches, metadata)
        rows = to_device(logits_indices, torch.int64, self.device)
        return self.model.compute_logits(hidden.index_select(0, rows))

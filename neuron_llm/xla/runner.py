"""A worker on the XLA device: each engine step is exactly one graph of a bucket's shapes.

``execute_and_sample`` records the forward, the logits and the sampler as one lazy graph,
cuts it with one ``sync`` and copies back, in one transfer, only what the host needs: the
sampled token ids, the logprob tensors when a row asked for logprobs, and the logits rows
of prompt positions when an entry asked for prompt logprobs (those are scored on the host).

The sampler runs on a static batch (``SamplingBatch.build_static``) of the bucket's
sequence count, so the graphs of a bucket are known before serving:

- the plain graph: any mix of greedy, random and seeded rows with temperature, top-k,
  top-p and min-p. Warm-up compiles it for every bucket.
- with speculative decoding, the verification graph of a prefill bucket (a step whose
  sequences compute proposals too): the rejection sampler on a static batch of a row per
  sequence and possible proposal (``sampling_block``), whatever the proposals. Warm-up
  compiles it for every prefill bucket when speculation is on.
- one more graph for each combination of logit_bias, penalties, min_tokens and logprobs
  that some step uses (15 at most), and each of these again for steps with prompt-logprob
  rows. Warm-up compiles those of the engine's ``sampling_features``
  (``neuron_llm.sample.features``); the others compile on first use, with a warning, as any
  graph after warm-up does.

``execute`` (logits to the host, no sampling) is the forward-only graph.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from neuron_llm.backends import Backend
from neuron_llm.compile.artifact import cache_files
from neuron_llm.config import EngineConfig
from neuron_llm.models.llama import LlamaForCausalLM
from neuron_llm.sample import LogprobsTensors, RowState, SamplerOutput, SamplingBatch, sample
from neuron_llm.sample.rejection import verify
from neuron_llm.worker import StepInput, StepOutput, Worker, on_own_backend_and_device
from neuron_llm.xla import spmd
from neuron_llm.xla.device import compile_count, inline_python_numbers, sync, to_host, xla_device

logger = logging.getLogger(__name__)


class XlaWorker(Worker):
    """``Worker`` on torch-xla's device, cutting one graph per step and keeping its shapes static.

    Against ``Worker``: the KV pools are materialized at construction (else the first step's
    graph would also hold their zero fill and differ from the rest); the logits rows are
    padded to the bucket's sequence count (else each distinct number of sampled sequences
    would be a new graph); sampling runs on the device in the step's graph; steps run under
    ``no_grad``, since torch-xla cannot take views of ordinary tensors under
    ``inference_mode``; and each step ends with one ``sync`` before one read to the host.
    The model is moved to the XLA device; under tensor parallelism, whole, with its weights
    and KV pools sharded over the process's devices by annotation (``neuron_llm.xla.spmd``).
    """

    pads_to_bucket = True

    def __init__(
        self, model: LlamaForCausalLM, config: EngineConfig, num_kv_blocks: int, backend: Backend | None = None
    ) -> None:
        if torch.device(config.device.device).type != "xla":
            raise ValueError(f"device={config.device.device!r}: XlaWorker runs on the 'xla' device")
        inline_python_numbers()
        tensor_parallel_size = config.parallel.tensor_parallel_size
        self._mesh = None
        if tensor_parallel_size > 1:
            self._mesh = spmd.make_mesh(tensor_parallel_size)
        super().__init__(model.to(xla_device()), config, num_kv_blocks, backend)
        if self._mesh is not None:
            self.weight_bytes = spmd.shard_model(self.model, self._mesh)
            spmd.shard_kv_caches(self.kv_caches, self._mesh)
        sync()
        self._num_compiled = 0
        """Graphs this worker's steps compiled, counted around each step: another worker (a draft
        model's) compiles in the same process."""
        self._is_warm = False
        self._watched: tuple[Path, set[str]] | None = None
        """An artifact's compile cache, and the files it held (``watch_compile_cache``)."""

    def num_kv_heads(self) -> int:
        """All of them: under tensor parallelism the pools are split by annotation (``spmd``)."""
        return self.config.model.num_key_value_heads

    def trace(self, step: StepInput, num_verified_rows: int | None = None) -> torch.Tensor:
        """Record one step (forward, KV writes, logits) without running it.

        ``num_verified_rows``: the sampling rows of a verification step (None: a plain step,
        one sampling row a sequence). Returns the pending fp32 logits: the sampling rows
        padded to ``sampling_block``, then the prompt rows, if any, padded to
        ``num_padded_tokens``, so a bucket has a few logits shapes, never one per row count;
        padding rows repeat row 0. Raises ``ValueError`` when the step is not padded to a
        bucket.
        """
        if step.num_padded_tokens is None or step.num_padded_seqs is None or step.max_blocks_per_seq is None:
            raise ValueError("an XLA step needs num_padded_tokens, num_padded_seqs and max_blocks_per_seq (a bucket)")
        sampling, prompt = split_logits_indices(step, num_verified_rows)
        sampling_block = self.sampling_block(step, verifying=num_verified_rows is not None)
        if len(sampling) > sampling_block or len(prompt) > step.num_padded_tokens:
            raise ValueError(
                f"{len(sampling)} sampling and {len(prompt)} prompt logits rows exceed the bucket's "
                f"{sampling_block} and {step.num_padded_tokens}"
            )
        prompt_block = step.num_padded_tokens if prompt else 0
        indices = sampling + [0] * (sampling_block - len(sampling)) + prompt + [0] * (prompt_block - len(prompt))
        logits = self.forward(step, indices)
        return logits if self._mesh is None else spmd.gather_logits(logits, self._mesh)

    def sampling_block(self, step: StepInput, verifying: bool) -> int:
        """Logits rows a step's graph gives its sampling rows: one a sequence; when it verifies
        proposals, one a sequence and proposal (``num_speculative_tokens + 1`` a sequence), at
        most one a token. Static per bucket: its one verification graph fits any proposals."""
        assert step.num_padded_seqs is not None and step.num_padded_tokens is not None
        if not verifying:
            return step.num_padded_seqs
        assert self.config.speculative is not None, "verifying proposals without speculative decoding"
        return num_verified_rows(
            step.num_padded_tokens, step.num_padded_seqs, self.config.speculative.num_speculative_tokens
        )

    @on_own_backend_and_device
    @torch.no_grad()
    def trace_sampled(self, step: StepInput, batch: SamplingBatch) -> tuple[SamplerOutput, torch.Tensor | None]:
        """Record one step and its sampling (the graph ``execute_and_sample`` runs) without running it.

        ``batch`` is a static batch of ``step.num_padded_seqs`` rows. Returns the pending
        sampler output of those rows and the pending prompt logits rows after them
        [num_padded_tokens, vocab_size], or None when the step reads no prompt rows.
        """
        num_seqs = batch.num_rows
        assert num_seqs == step.num_padded_seqs, (num_seqs, step.num_padded_seqs)
        logits = self.trace(step)
        sampled = sample(logits[:num_seqs], batch)
        return sampled, _rows_after(logits, num_seqs)

    @on_own_backend_and_device
    @torch.no_grad()
    def trace_verified(
        self,
        step: StepInput,
        rows: Sequence[RowState],
        draft_token_ids: Sequence[Sequence[int]],
        eos_token_ids: Sequence[int] = (),
    ) -> tuple[SamplerOutput, torch.Tensor | None]:
        """Record one step and the verification of ``draft_token_ids`` (speculative decoding).

        As ``trace_sampled``, for a step whose sequence ``s`` has ``len(draft_token_ids[s]) + 1``
        sampling rows: they are verified on a static batch of the graph's ``sampling_block``,
        whatever the proposals, so a bucket has one verification graph.
        """
        num_rows = len(rows) + sum(map(len, draft_token_ids))
        logits = self.trace(step, num_rows)
        block = self.sampling_block(step, verifying=True)
        sampled = verify(logits[:block], rows, draft_token_ids, eos_token_ids, num_static_rows=block)
        return sampled, _rows_after(logits, block)

    def execute(self, step: StepInput, sampled_before: torch.Tensor | None = None) -> torch.Tensor:
        """Run one step as one graph; return its fp32 logits [len(step.logits_indices), vocab_size] on the CPU.

        The logits rows are those of ``step.logits_indices``, each sampling row and prompt row once.
        """
        _refuse_placeholders(sampled_before)
        compiled_before = compile_count()
        sampling, prompt = split_logits_indices(step, None)
        logits = self.trace(step)
        sync()
        self._count_compiled(compiled_before, step, "no sampling")
        # Slice on the host: slicing the device tensor by a varying length would be a new graph.
        block = self.sampling_block(step, verifying=False)
        host = logits.cpu()
        return torch.cat([host[: len(sampling)], host[block : block + len(prompt)]])

    def execute_and_sample(
        self,
        step: StepInput,
        rows: Sequence[RowState],
        eos_token_ids: Sequence[int] = (),
        sampled_before: torch.Tensor | None = None,
        draft_token_ids: Sequence[Sequence[int]] | None = None,
    ) -> StepOutput:
        """Run one step and its sampling (or verification) as one graph; read back only the tokens (and logprobs).

        As ``Worker.execute_and_sample``, with the returned tensors on the CPU. The graph's
        sampling rows past the real ones are sampled too (greedily) and dropped on the host.
        """
        _refuse_placeholders(sampled_before)
        if step.num_padded_seqs is None:
            raise ValueError("an XLA step needs num_padded_seqs (a bucket)")
        compiled_before = compile_count()
        if draft_token_ids and any(draft_token_ids):
            sampled, prompt_logits = self.trace_verified(step, rows, draft_token_ids, eos_token_ids)
            num_rows = len(rows) + sum(map(len, draft_token_ids))
            variant = _verification_variant(rows)
        else:
            batch = SamplingBatch.build_static(
                rows, self.config.model.vocab_size, self.device, step.num_padded_seqs, eos_token_ids
            )
            sampled, prompt_logits = self.trace_sampled(step, batch)
            num_rows = len(rows)
            variant = _sampling_variant(batch)
        sync()
        if prompt_logits is not None:
            variant += " + prompt logprobs"
        self._count_compiled(compiled_before, step, variant)
        return self._read_back(sampled if rows else None, num_rows, len(rows), prompt_logits, step)

    def _read_back(
        self,
        sampled: SamplerOutput | None,
        num_rows: int,
        num_seqs: int,
        prompt_logits: torch.Tensor | None,
        step: StepInput,
    ) -> StepOutput:
        """Copy what the host needs in one transfer; slice the real rows there.

        Slicing on the device by a varying row count would make a new graph per count.
        """
        pending = sampled_outputs(sampled) if sampled is not None else []
        host = to_host(pending + ([prompt_logits] if prompt_logits is not None else []))
        output = None
        if sampled is not None:
            num_logprobs = len(pending) - 1 - (sampled.num_accepted is not None)
            host_logprobs = [tensor[:num_rows] for tensor in host[1 : 1 + num_logprobs]]
            num_accepted = host[1 + num_logprobs][:num_seqs] if sampled.num_accepted is not None else None
            output = SamplerOutput(
                host[0][:num_rows], LogprobsTensors(*host_logprobs) if num_logprobs else None, num_accepted
            )
        if prompt_logits is None:
            return StepOutput(output, torch.empty(0, self.config.model.vocab_size))
        _, prompt = split_logits_indices(step, num_rows)
        return StepOutput(output, host[-1][: len(prompt)])

    def num_compiled_graphs(self) -> int:
        return self._num_compiled

    def mark_warmed_up(self) -> None:
        self._is_warm = True

    def watch_compile_cache(self, cache: Path) -> None:
        self._watched = (cache, cache_files(cache))

    def _count_compiled(self, compiled_before: int, step: StepInput, variant: str) -> None:
        """Count the graphs compiled since ``compiled_before``; warn of any after warm-up, and of
        any an artifact lacked (graphs built lazily, ``warm_up=False``, found in it are not)."""
        compiled = compile_count() - compiled_before
        self._num_compiled += compiled
        if compiled and self._watched is not None:
            cache, seen = self._watched
            if added := sorted(cache_files(cache) - seen):
                seen.update(added)
                logger.warning(
                    "compiled %d cache file(s) the artifact lacks for a step of %d tokens, %d sequences (%s), "
                    "e.g. %s: compile the artifact again with the sampling_features this model serves",
                    len(added),
                    step.num_padded_tokens,
                    step.num_padded_seqs,
                    variant,
                    added[0],
                )
        if self._is_warm and compiled:
            logger.warning(
                "compiled a new graph after warm-up for a step of %d tokens, %d sequences (%s): warm-up "
                "compiles each bucket's plain sampling graph (and, with speculative decoding, each prefill "
                "bucket's verification graph), and those of the sampling_features chosen; other uses of "
                "logit_bias, penalties, min_tokens, logprobs and prompt logprobs compile once per bucket "
                "when first served; any other shape is missing from the buckets",
                step.num_padded_tokens,
                step.num_padded_seqs,
                variant,
            )


def _rows_after(logits: torch.Tensor, num_rows: int) -> torch.Tensor | None:
    """The prompt logits rows after the first ``num_rows``, None when there are none. A copy:
    a view would keep all of ``logits`` alive, and a sync makes every live tensor an output,
    so the served graph would not be the one exported."""
    return logits[num_rows:].clone() if logits.shape[0] > num_rows else None


def sampled_outputs(sampled: SamplerOutput) -> list[torch.Tensor]:
    """What a step's graph hands the host of its sampler's output, in this order: the token ids,
    the logprob tensors (in the order ``LogprobsTensors`` takes them) when asked for, and
    ``num_accepted`` after verifying proposals. Exported graphs end in the same outputs."""
    logprobs = sampled.logprobs
    fields = [] if logprobs is None else [getattr(logprobs, f.name) for f in dataclasses.fields(logprobs)]
    accepted = [] if sampled.num_accepted is None else [sampled.num_accepted]
    return [sampled.token_ids, *fields, *accepted]


def _sampling_variant(batch: SamplingBatch) -> str:
    """Names the optional parts of a sampling graph, for the warning about a new one."""
    parts = {
        "logit_bias": batch.logit_bias is not None,
        "penalties": batch.penalties is not None,
        "min_tokens": batch.min_tokens_mask is not None,
        "logprobs": batch.num_logprobs is not None,
    }
    return " + ".join(["sampling"] + [name for name, used in parts.items() if used])


def _verification_variant(rows: Sequence[RowState]) -> str:
    """Names the optional parts a verification graph likely holds (from the rows' parameters:
    the exact ones depend on each proposal's row), for the warning about a new one."""
    parts = {
        "logit_bias": any(row.params.has_token_bias for row in rows),
        "penalties": any(row.params.has_penalties for row in rows),
        "min_tokens": any(row.is_min_tokens_unmet for row in rows),
        "logprobs": any(row.params.logprobs is not None for row in rows),
    }
    return " + ".join(["verification"] + [name for name, used in parts.items() if used])


def num_verified_rows(num_tokens: int, num_seqs: int, num_speculative_tokens: int) -> int:
    """Sampling rows of a bucket's verification graph: room for every sequence's proposals and
    the token after them, and no more rows than tokens."""
    return min(num_tokens, num_seqs * (num_speculative_tokens + 1))


def split_logits_indices(step: StepInput, num_sampling_rows: int | None) -> tuple[list[int], list[int]]:
    """``step.logits_indices`` as (sampling rows, prompt rows).

    ``num_sampling_rows`` counts the real sampling rows (None: a plain step's, one a sequence
    padded to ``num_padded_seqs``); the runner pads them to ``num_padded_seqs`` when they
    fit, and the prompt rows follow.
    """
    assert step.num_padded_seqs is not None
    indices = step.logits_indices
    if num_sampling_rows is None:
        num_sampling_rows = min(len(indices), step.num_padded_seqs)
    if len(indices) <= num_sampling_rows:
        return indices[:num_sampling_rows], []
    return indices[:num_sampling_rows], indices[max(num_sampling_rows, step.num_padded_seqs) :]


def _refuse_placeholders(sampled_before: torch.Tensor | None) -> None:
    # A graph per bucket takes its input ids from the host; EngineConfig refuses async scheduling here.
    if sampled_before is not None:
        raise ValueError("placeholder input ids are not supported on the XLA device (async scheduling)")

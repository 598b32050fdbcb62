"""From a scheduler step to sampled tokens: pack the flat batch, pad it to a bucket, run it.

The flat batch holds every scheduled token of every request back to back::

    input_ids:  | req A: 5 prompt tokens | req B: 1 decode token | req C: chunk of 8 | pad .. |
    rows read:                        ^A                       ^B                  (C: none)

and is padded to the smallest bucket (``neuron_llm.buckets``), so every forward has one of a
known set of shapes. Logits are computed only for the rows that sample (the last token of
each request that reached the end of its known tokens) and for prompt positions whose
logprobs were asked for; the sampling rows are sampled on the device, in the same step.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from neuron_llm.buckets import Bucket, BucketSet
from neuron_llm.config import EngineConfig
from neuron_llm.engine.scheduler import ScheduledRequest, SchedulerOutput
from neuron_llm.ops.metadata import NULL_BLOCK_ID
from neuron_llm.parallel.executor import Executor
from neuron_llm.sample import PADDING_ROW, RowState, SamplerOutput
from neuron_llm.sample.features import dummy_logits_indices, feature_row, feature_sets
from neuron_llm.worker import StepInput


@dataclass
class StepResult:
    sampled: SamplerOutput | None
    """One token per sampling entry, in their order; None when no entry samples."""
    prompt_logits: list[torch.Tensor | None]
    """Per scheduled entry: logits at its prompt positions whose logprobs were asked for."""


class ModelRunner:
    """Packs scheduler steps into bucketed ``StepInput``s and runs them on the executor."""

    def __init__(self, config: EngineConfig, executor: Executor, buckets: BucketSet | None = None) -> None:
        self.executor = executor
        self.device = torch.device(config.device.device)
        self.block_size = config.cache.block_size
        self.buckets = buckets or BucketSet.for_engine(config)
        self.speculative = config.speculative is not None
        self.sampling_features = config.device.sampling_features

    def execute(
        self,
        scheduled: SchedulerOutput,
        wants_prompt_logprobs: Callable[[ScheduledRequest], bool],
        sampling_rows: Sequence[RowState] = (),
        eos_token_ids: Sequence[int] = (),
        sampled_before: torch.Tensor | None = None,
    ) -> StepResult:
        """Run the step and sample ``sampling_rows``, one per sampling entry in their order.

        ``wants_prompt_logprobs(entry)`` says whose prompt rows to return; ``eos_token_ids``
        are held back from rows short of min_tokens; ``sampled_before`` (the previous step's
        token ids, on the device) fills the input ids that are placeholders for them. Entries
        with proposals (``num_draft_tokens``) have them verified.
        """
        sampling = [entry for entry in scheduled.scheduled if entry.is_sampling]
        assert len(sampling_rows) == len(sampling)
        step, prompt_rows = self._pack(scheduled, wants_prompt_logprobs)
        drafts = None
        if any(entry.num_draft_tokens for entry in sampling):
            drafts = [entry.token_ids[len(entry.token_ids) - entry.num_draft_tokens :] for entry in sampling]
        output = self.executor.execute_and_sample(step, sampling_rows, eos_token_ids, sampled_before, drafts)
        prompt_logits: list[torch.Tensor | None] = []
        offset = 0
        for rows in prompt_rows:
            if not rows:
                prompt_logits.append(None)
                continue
            prompt_logits.append(output.prompt_logits[offset : offset + len(rows)])
            offset += len(rows)
        return StepResult(output.sampled, prompt_logits)

    def warm_up(self) -> int:
        """Run one dummy step of every bucket, so a compiling backend builds each graph now.

        Each step samples (padding rows only), so its graph is the one steps of plain
        requests run, greedy and sampled alike. On a device that compiles a graph per shape,
        each bucket also samples a dummy row using each combination of the configured
        ``sampling_features``, and with speculative decoding each prefill bucket verifies a
        dummy proposal (with each combination too): the graph of every verification step.
        Each runs at every block-table width a step of it can take (one, off the XLA device).
        Returns the number of graphs compiled; afterwards the worker warns about any new one.
        """
        static = self.executor.worker.pads_to_bucket
        combos: list[tuple[str, ...]] = [(), *feature_sets(self.sampling_features)] if static else [()]
        # Largest first: CUDA graphs captured into one memory pool then reuse the blocks the
        # largest freed, where in the other order each larger graph would add its own.
        for bucket in sorted(self.buckets.all, key=lambda b: (b.num_tokens, b.num_seqs), reverse=True):
            for width, features in itertools.product(reversed(self.buckets.widths_for(bucket)), combos):
                rows = [feature_row(features)] if features else []
                step = _dummy_step(bucket, width, self.block_size, features)
                self.executor.execute_and_sample(step, rows)
                if static and self.speculative and bucket.kind == "prefill":
                    # The proposal's row follows its sequence's.
                    step = _dummy_step(bucket, width, self.block_size, features, 2)
                    self.executor.execute_and_sample(step, rows or [PADDING_ROW], draft_token_ids=[[0]])
        self.executor.worker.mark_warmed_up()
        return self.executor.worker.num_compiled_graphs()

    def _pack(
        self, scheduled: SchedulerOutput, wants_prompt_logprobs: Callable[[ScheduledRequest], bool]
    ) -> tuple[StepInput, list[list[int] | None]]:
        input_ids: list[int] = []
        positions: list[int] = []
        sample_rows: list[int] = []
        prompt_rows: list[list[int] | None] = []
        for entry in scheduled.scheduled:
            start = len(input_ids)
            input_ids += entry.token_ids
            positions += range(entry.num_computed_tokens, entry.seq_len)
            if entry.is_sampling:
                # The last known token's row, and each proposal's after it.
                sample_rows += range(len(input_ids) - 1 - entry.num_draft_tokens, len(input_ids))
            rows = None
            if wants_prompt_logprobs(entry):
                # Position p scores prompt token p + 1, so the prompt's last position has none.
                last = min(entry.seq_len, entry.request.num_prompt_tokens - 1)
                rows = [start + p - entry.num_computed_tokens for p in range(entry.num_computed_tokens, last)]
            prompt_rows.append(rows)
        entries = scheduled.scheduled
        is_decode = all(entry.num_new_tokens == 1 for entry in entries)
        bucket = self.buckets.select(len(input_ids), len(entries), is_decode)
        fits = len(sample_rows) <= bucket.num_seqs or self.executor.worker.pads_to_bucket
        if not fits and len(sample_rows) <= self.buckets.prefill[-1].num_seqs:
            # Verifying proposals: a bucket with a logits row for each lets a CUDA graph run the
            # step. (An XLA bucket's verification graph has a row for every sequence's proposals.)
            bucket = self.buckets.select(len(input_ids), len(sample_rows), is_decode)
        # Sampling rows are padded to the bucket's sequence count so the logits have a static shape.
        sample_rows += [0] * (bucket.num_seqs - len(sample_rows))
        # Blocks past a sequence's last token (allocated ahead for proposals) are not read.
        width = self.buckets.width_for(max(-(-entry.seq_len // self.block_size) for entry in entries))
        step = StepInput(
            input_ids=input_ids,
            positions=list(positions),
            query_lens=[entry.num_new_tokens for entry in entries],
            seq_lens=[entry.seq_len for entry in entries],
            block_tables=[entry.block_ids[:width] for entry in entries],
            logits_indices=sample_rows + [row for rows in prompt_rows if rows for row in rows],
            num_padded_tokens=bucket.num_tokens,
            num_padded_seqs=bucket.num_seqs,
            max_blocks_per_seq=width,
        )
        return step, prompt_rows


def _dummy_step(
    bucket: Bucket,
    max_blocks_per_seq: int,
    block_size: int,
    features: Sequence[str] = (),
    num_sampling_rows: int = 1,
) -> StepInput:
    """A step of exactly ``bucket``'s shapes and block-table width whose K/V all land in the
    null block.

    Graphs depend only on shapes, so running this compiles the graph every real step of the
    bucket reuses. Tokens are spread over as many sequences as the width's context needs,
    the rest padding where even the bucket's sequences hold fewer. With the
    ``prompt_logprobs`` feature, a logits row of a prompt position follows the
    ``num_sampling_rows`` that sample (padded to the bucket's sequences).
    """
    capacity = max_blocks_per_seq * block_size
    num_real = min(bucket.num_tokens, bucket.num_seqs * capacity)
    num_seqs = bucket.num_seqs if bucket.kind == "decode" else -(-num_real // capacity)
    query_lens = [num_real // num_seqs + (i < num_real % num_seqs) for i in range(num_seqs)]
    table = [NULL_BLOCK_ID] * max_blocks_per_seq
    return StepInput(
        input_ids=[0] * num_real,
        positions=[p for n in query_lens for p in range(n)],
        query_lens=query_lens,
        seq_lens=query_lens,
        block_tables=[table] * num_seqs,
        logits_indices=dummy_logits_indices(bucket.num_seqs, num_sampling_rows, features),
        num_padded_tokens=bucket.num_tokens,
        num_padded_seqs=bucket.num_seqs,
        max_blocks_per_seq=max_blocks_per_seq,
    )

"""The known set of step shapes (buckets) that every flat batch is padded up to.

Each step is padded to the smallest bucket that holds it, so the set of graphs a backend
ever runs is finite and known before serving: one NEFF per bucket on Neuron; on GPU one CUDA
graph per decode bucket and per prefill bucket up to ``max_prefill_graph_tokens``, and a
second for a long prefill bucket's whole prompts (``backends.cuda.graphs``); a step that
runs eagerly computes only its real tokens. Two kinds of bucket:

- decode: every sequence computes one token; ``num_tokens == num_seqs``, at most the
  step's token budget.
- prefill: anything else (prompts, chunks, mixed with decodes); tokens padded to a power of
  two, or past ``prefill_step`` tokens to a multiple of it where a bucket is cheap (a CUDA
  graph, not a compiled NEFF); sequences to ``max_num_seqs``, or to the bucket's tokens where
  those are fewer, since every sequence of a step computes at least one token.

The block-table width is ``max_blocks_per_seq`` (max_model_len / block_size), except on the
XLA device, whose attention computes every key of the width: there a step's tables are cut
to the smallest of a few context lengths holding its longest sequence, and each bucket has a
graph per width (``context_lengths``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from neuron_llm.config import EngineConfig

FINE_PREFILL_STEP = 128
"""Prefill tokens past which buckets grow linearly by this step, on devices that take it."""

MIN_CONTEXT_BUCKET = 512
"""The shortest default context length on the XLA device: its attention walks the keys this
many at a time (``backends.neuron.CHUNK_KEYS``), so a shorter width saves little."""

NUM_DEFAULT_CONTEXT_BUCKETS = 3
"""Default context lengths below ``max_model_len``, each a quarter of the one above: every
length is a graph per bucket (minutes each with neuronx-cc), so they are few, and a step
computes at most 4x the keys its longest sequence needs."""


@dataclass(frozen=True, order=True)
class Bucket:
    num_tokens: int
    num_seqs: int
    kind: str
    """"decode" or "prefill"."""

    @property
    def name(self) -> str:
        return f"{self.kind}_t{self.num_tokens}_s{self.num_seqs}"


def _powers_of_two_up_to(limit: int, start: int = 1) -> list[int]:
    sizes = []
    size = start
    while size < limit:
        sizes.append(size)
        size *= 2
    return sizes + [limit]


@dataclass(frozen=True)
class BucketSet:
    decode: tuple[Bucket, ...]
    prefill: tuple[Bucket, ...]
    block_table_widths: tuple[int, ...]
    """Block-table widths a step is padded to, ascending; the last is ``max_blocks_per_seq``."""
    block_size: int

    @classmethod
    def default(
        cls,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        block_size: int,
        prefill_step: int | None = None,
        num_speculative_tokens: int | None = None,
        context_lengths: Sequence[int] = (),
    ) -> BucketSet:
        """Powers of two up to the scheduler's limits (the limits themselves included); with
        ``prefill_step``, prefill buckets past it grow by that many tokens instead of doubling
        (with 256, a step of 513 tokens computes 768 rows, not 1,024). With
        ``num_speculative_tokens`` (k), a prefill bucket of ``s * (k + 1)`` tokens over ``s``
        sequences for each decode bucket's ``s``: the step that verifies every decoding
        sequence's proposals (with k=4 a sequence's is 5 tokens, not the 16 of the smallest
        prompt bucket). Block tables take the widths of ``context_lengths`` (tokens) and of
        ``max_model_len``."""
        decode_sizes = _powers_of_two_up_to(min(max_num_seqs, max_num_batched_tokens))
        decode = tuple(Bucket(s, s, "decode") for s in decode_sizes)
        # No step holds more than max_model_len tokens of each of max_num_seqs sequences.
        max_step_tokens = min(max_num_batched_tokens, max_num_seqs * max_model_len)
        prefill_sizes = _powers_of_two_up_to(max_step_tokens, start=min(16, max_step_tokens))
        if prefill_step is not None:
            steps = range(prefill_step, max_step_tokens, prefill_step)
            prefill_sizes = sorted({s for s in prefill_sizes if s <= prefill_step}.union(steps, [max_step_tokens]))
        prefill = {Bucket(t, min(max_num_seqs, t), "prefill") for t in prefill_sizes}
        if num_speculative_tokens is not None:
            rows_per_seq = num_speculative_tokens + 1
            prefill |= {
                Bucket(s * rows_per_seq, s, "prefill") for s in decode_sizes if s * rows_per_seq <= max_step_tokens
            }
        widths = {-(-length // block_size) for length in (*context_lengths, max_model_len) if length <= max_model_len}
        return cls(decode, tuple(sorted(prefill)), tuple(sorted(widths)), block_size)

    @classmethod
    def for_engine(cls, config: EngineConfig) -> BucketSet:
        """The buckets an engine of ``config`` serves."""
        on_xla, speculative = config.device.device.startswith("xla"), config.speculative
        return cls.default(
            config.scheduler.max_num_seqs,
            config.scheduler.max_num_batched_tokens,
            config.max_model_len,
            config.cache.block_size,
            # Each bucket is a compilation on XLA (minutes on Neuron); elsewhere a CUDA graph
            # or nothing, so finer prefill buckets cost little and pad less.
            prefill_step=None if on_xla else FINE_PREFILL_STEP,
            # On XLA a step computes its whole bucket: a verification step of a few tokens
            # would compute the smallest prompt bucket's (elsewhere its graph or eager step
            # costs little more than a decode step's).
            num_speculative_tokens=speculative.num_speculative_tokens if on_xla and speculative else None,
            context_lengths=context_lengths(config) if on_xla else (),
        )

    @property
    def max_blocks_per_seq(self) -> int:
        return self.block_table_widths[-1]

    def widths_for(self, bucket: Bucket) -> tuple[int, ...]:
        """The block-table widths at which some step runs ``bucket``: every width for a decode
        bucket, and ``max_blocks_per_seq``; a narrower width for a prefill bucket only where
        sequences of that context can hold a step the bucket is chosen for (a step of 8,192
        tokens over one sequence never runs at a 512-token width). Warm-up compiles these."""
        return tuple(
            width
            for width in self.block_table_widths
            if bucket.kind == "decode" or width == self.max_blocks_per_seq or bucket in self._prefill_at(width)
        )

    def _prefill_at(self, width: int) -> frozenset[Bucket]:
        # A prefill step of k sequences holds k + 1 to k x (width's context) tokens, within the
        # largest bucket; the buckets chosen for those, in order, are the ones from the first
        # chosen to the last (a bucket between them is chosen for one more than the tokens of
        # the bucket before it, or is passed over: one graph too many, never one too few).
        largest, chosen = self.prefill[-1], set()
        for k in range(1, largest.num_seqs + 1):
            low, high = k + 1, min(k * width * self.block_size, largest.num_tokens)
            if low > high:
                continue
            eligible = [bucket for bucket in self.prefill if bucket.num_seqs >= k]
            first, last = (eligible.index(self.select(n, k, is_decode=False)) for n in (low, high))
            chosen.update(eligible[first : last + 1])
        return frozenset(chosen)

    def width_for(self, num_blocks: int) -> int:
        """The narrowest block-table width holding ``num_blocks`` blocks."""
        for width in self.block_table_widths:
            if width >= num_blocks:
                return width
        raise ValueError(f"{num_blocks} blocks exceed the widest block table ({self.max_blocks_per_seq})")

    @property
    def all(self) -> tuple[Bucket, ...]:
        return self.decode + self.prefill

    def select(self, num_tokens: int, num_seqs: int, is_decode: bool) -> Bucket:
        """The smallest bucket holding a step; ``ValueError`` naming the shape when none does."""
        for bucket in self.decode if is_decode else self.prefill:
            if bucket.num_tokens >= num_tokens and bucket.num_seqs >= num_seqs:
                return bucket
        kind = "decode" if is_decode else "prefill"
        raise ValueError(
            f"a {kind} step of {num_tokens} tokens over {num_seqs} sequences fits no configured bucket "
            f"(largest: {(self.decode if is_decode else self.prefill)[-1]})"
        )


def context_lengths(config: EngineConfig) -> tuple[int, ...]:
    """The XLA device's context lengths below ``max_model_len`` (which ``BucketSet.default``
    adds): ``context_buckets``, or by default ``max_model_len`` / 4, / 16 and / 64, none
    shorter than ``MIN_CONTEXT_BUCKET``."""
    if config.device.context_buckets is not None:
        return tuple(length for length in config.device.context_buckets if length < config.max_model_len)
    quarters = (config.max_model_len // 4**i for i in range(1, NUM_DEFAULT_CONTEXT_BUCKETS + 1))
    return tuple(sorted(length for length in quarters if length >= MIN_CONTEXT_BUCKET))

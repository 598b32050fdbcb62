"""Iteration-level scheduling over a paged KV cache.

Requests join and leave the running batch at every step (Orca, Yu et al., OSDI 2022,
https://www.usenix.org/conference/osdi22/presentation/yu); their K/V lives in blocks
(PagedAttention, Kwon et al., SOSP 2023, https://arxiv.org/abs/2309.06180). Each step gets
a token budget (``max_num_batched_tokens``) and a sequence limit (``max_num_seqs``)::

    | running, oldest first:                  | waiting, first come first served:          |
    |  decodes (1 token), unfinished prefills |  prompts (prefix-cache hits skipped),       |
    |  newest preempted when blocks run out   |  chunked to the budget left; admitted only  |
    |                                         |  while blocks are free, never by preemption |

A preempted request frees its blocks, goes back into the waiting queue in arrival order
(usually at its front) and is recomputed from token 0 (prompt and output so far) when
admitted again. Running requests are kept in arrival order, so the newest is always last,
and a request is never preempted to make room for one that arrived after it. The oldest
running request can always preempt every other one, and ``add_request`` refuses requests
that would not fit in the pool alone, so the oldest always progresses.

Steps alternate ``schedule()`` (what to compute) and ``update_from_output()`` (the sampled
tokens). Stop tokens and strings are judged outside, which then calls ``finish``.

With speculative decoding a decoding request carries proposals (``draft_token_ids``, set
before ``schedule()``): the step computes them after its last token, within the budget and
the blocks free (proposals never preempt), and ``update_from_output`` takes the tokens the
verification kept plus one, and takes back the K/V of the proposals refused.
"""

from __future__ import annotations

import bisect
import itertools
import logging
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from neuron_llm.engine.block_manager import BlockManager, PrefixHit
from neuron_llm.engine.request import Request, RequestStatus

if TYPE_CHECKING:
    from neuron_llm.config import CacheConfig, SchedulerConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScheduledRequest:
    """One request's share of a step: its tokens ``num_computed_tokens .. seq_len - 1``."""

    request: Request
    num_computed_tokens: int
    """Tokens already in the KV cache before this step; the position of the first new token."""
    num_new_tokens: int
    """Tokens computed this step."""
    is_sampling: bool
    """The step reaches the last known token, so a new token is sampled from its logits. False
    for a prefill chunk that stops short of the prompt's end."""
    token_ids: list[int]
    """The ``num_new_tokens`` input tokens."""
    block_ids: list[int]
    """The block table as of this step."""
    num_draft_tokens: int = 0
    """The last ``num_draft_tokens`` of ``token_ids`` are proposals (speculative decoding)
    after the last known token, which this step verifies; ``is_sampling`` is then True."""

    @property
    def seq_len(self) -> int:
        """Context length after this step."""
        return self.num_computed_tokens + self.num_new_tokens


@dataclass(frozen=True)
class SchedulerOutput:
    """What one step computes, and what changed since the previous step."""

    scheduled: list[ScheduledRequest]
    """Running requests first (oldest first), then newly admitted ones."""
    preempted_ids: list[str]
    """Requests that lost their blocks this step."""

    @property
    def num_scheduled_tokens(self) -> int:
        """Tokens in the flat batch, before padding."""
        return sum(entry.num_new_tokens for entry in self.scheduled)

    @property
    def is_empty(self) -> bool:
        """Whether nothing is computed this step."""
        return not self.scheduled


@dataclass(frozen=True)
class SchedulerStats:
    """Gauges and counters for metrics."""

    num_waiting: int
    num_running: int
    num_preemptions: int
    """Preemptions since the scheduler was built."""
    kv_cache_usage: float
    """Fraction of usable KV blocks held by requests."""
    prefix_cache_hit_rate: float
    """Prompt tokens found in the prefix cache over prompt tokens looked up."""


@dataclass(frozen=True)
class _SummedNeeds:
    """Running sums over the running requests, in order, of what each would compute this step
    left to itself: ``tokens[i]`` and ``blocks[i]`` (fresh ones) of the first ``i``."""

    tokens: list[int]
    blocks: list[int]


class Scheduler:
    """Decides, each step, which requests compute how many tokens, and owns their KV blocks.

    Args:
        cache_config: block size and whether prefix caching is on.
        scheduler_config: step limits; ``max_model_len`` must be set (``EngineConfig`` sets it).
        num_blocks: blocks in the KV pool, the reserved null block included.
    """

    def __init__(self, cache_config: CacheConfig, scheduler_config: SchedulerConfig, num_blocks: int) -> None:
        if scheduler_config.max_model_len is None:
            raise ValueError("scheduler_config.max_model_len=None: set it (EngineConfig fills it from the model)")
        self.config = scheduler_config
        self.max_model_len: int = scheduler_config.max_model_len
        self.block_manager = BlockManager(num_blocks, cache_config.block_size, cache_config.enable_prefix_caching)
        # The K/V of every token but the last sampled one is stored, so a pool of N usable
        # blocks holds one sequence of N * block_size + 1 tokens.
        pool_len = self.block_manager.num_usable_blocks * cache_config.block_size + 1
        self.max_seq_len: int = min(self.max_model_len, pool_len)
        """The longest sequence (prompt and output) the engine can run: ``max_model_len``, or
        less when the KV pool holds fewer tokens. Requests without ``max_tokens`` stop there."""
        if self.max_seq_len < self.max_model_len:
            logger.warning(
                "the KV pool (%d blocks of %d) holds %d tokens of one sequence, fewer than max_model_len=%d: "
                "requests without max_tokens stop there with finish_reason 'length'; "
                "enlarge the pool (num_kv_blocks) or lower max_model_len",
                self.block_manager.num_usable_blocks,
                cache_config.block_size,
                self.max_seq_len,
                self.max_model_len,
            )
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self._requests: dict[str, Request] = {}
        self._arrival_order: dict[str, int] = {}
        self._arrival_counter = itertools.count()
        self._waiting_hit: tuple[Request, PrefixHit] | None = None
        """The oldest waiting request's prefix-cache hit, as last looked up in this step."""

    def add_request(self, request: Request) -> None:
        """Queue a new request.

        Raises ``ValueError`` when its id is in use, its prompt is empty or leaves no room for
        output within ``max_model_len`` (within ``max_seq_len`` without ``max_tokens``), its
        prompt exceeds ``max_num_batched_tokens`` without chunked prefill, or its prompt plus
        ``max_tokens`` would not fit in the KV pool even alone (it could then never finish).
        """
        self._check_new(request)
        request.status = RequestStatus.WAITING
        self._register(request)
        self.waiting.append(request)

    def fork(self, parent_id: str, child: Request) -> None:
        """Add ``child``, a new request with the same prompt as ``parent_id``, sharing its K/V.

        For n > 1 completions of one prompt, computed once. The child takes a reference on the
        parent's computed full prompt blocks and joins the running batch; it computes the rest
        of the prompt, the partly filled block included, into blocks of its own. A parent that is not running (waiting,
        preempted, or already finished: its first token may have been its last) holds no
        blocks, and the child is then queued like any new request. Raises ``ValueError`` as
        ``add_request`` does, or when the prompts differ.
        """
        parent = self._requests.get(parent_id)
        if parent is not None and child.prompt_token_ids != parent.prompt_token_ids:
            raise ValueError(f"request {child.request_id!r}: a fork must have the prompt of {parent_id!r}")
        if parent is None or parent.status != RequestStatus.RUNNING:
            self.add_request(child)
            return
        self._check_new(child)
        block_size = self.block_manager.block_size
        num_shared = min(parent.num_computed_tokens, child.num_tokens - 1) // block_size * block_size
        child.block_ids = self.block_manager.fork(parent_id, child.request_id, num_shared)
        child.num_computed_tokens = child.num_cached_tokens = num_shared
        child.status = RequestStatus.RUNNING
        self._register(child)
        self._insert_running(child)

    def abort(self, request_id: str) -> bool:
        """Drop a request in any state and free its blocks; False if it is unknown or already done."""
        return self.finish(request_id, RequestStatus.FINISHED_ABORTED)

    def finish(self, request_id: str, status: RequestStatus) -> bool:
        """End a request with a finished ``status`` (a stop token: ``FINISHED_STOPPED``).

        Frees its blocks. Returns False if the request is unknown or already finished.
        """
        assert status.is_finished, status
        request = self._requests.get(request_id)
        if request is None:
            return False
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
            self.block_manager.free(request_id)
        else:
            self.waiting.remove(request)
        del self._requests[request_id]
        del self._arrival_order[request_id]
        request.status = status
        request.block_ids = []
        return True

    def schedule(self) -> SchedulerOutput:
        """Pick this step's tokens; advances each scheduled request's ``num_computed_tokens``."""
        scheduled: list[ScheduledRequest] = []
        preempted_ids: list[str] = []
        self._waiting_hit = None  # blocks are published between steps, never within one
        try:
            budget = self._schedule_running(scheduled, preempted_ids, self.config.max_num_batched_tokens)
            # A preemption means memory is short: admitting now would only preempt again.
            if not preempted_ids:
                self._schedule_waiting(scheduled, budget)
        except BaseException:  # a Ctrl-C: what was advanced so far is recorded (``_advance``)
            self._rewind(scheduled)
            raise
        return SchedulerOutput(scheduled, preempted_ids)

    def rewind(self, output: SchedulerOutput) -> None:
        """Take back ``schedule``'s advance of a step that failed before its results came back:
        its requests compute those tokens (and propose again) in a later step. Their blocks stay
        allocated; nothing of the step was published to the prefix cache."""
        self._rewind(output.scheduled)

    def _rewind(self, scheduled: list[ScheduledRequest]) -> None:
        for entry in scheduled:
            if entry.request.status == RequestStatus.RUNNING:
                entry.request.num_computed_tokens = entry.num_computed_tokens

    def update_from_output(self, output: SchedulerOutput, sampled: dict[str, list[int]]) -> list[str]:
        """Take the step's results: ``sampled[request_id]`` for each request that sampled.

        After verifying proposals a request may get several tokens: the proposals kept and
        one more. Appends sampled tokens (up to the length limit), takes back the proposals
        refused (their K/V is overwritten later), publishes the newly computed full blocks to
        the prefix cache, and finishes (freeing their blocks) requests that reached
        ``max_tokens`` or ``max_model_len`` (``max_seq_len`` without ``max_tokens``). Requests
        finished while the step ran are skipped. Returns the ids finished by length.
        """
        finished_ids: list[str] = []
        for entry in output.scheduled:
            request = entry.request
            if request.status != RequestStatus.RUNNING:
                continue
            reached_length = entry.is_sampling and self._append_sampled(request, sampled[request.request_id])
            # Every token but the last sampled one has its K/V in the cache.
            request.num_computed_tokens = min(request.num_computed_tokens, request.num_tokens - 1)
            if entry.num_draft_tokens:
                # Blocks taken for refused proposals go back now, not when the request ends:
                # held, they would keep a waiting request out or preempt a running one.
                self.block_manager.trim(request.request_id, request.num_tokens)
            self.block_manager.cache_full_blocks(request.request_id, request.all_token_ids, request.num_computed_tokens)
            if reached_length:
                self.finish(request.request_id, RequestStatus.FINISHED_LENGTH)
                finished_ids.append(request.request_id)
        return finished_ids

    def has_unfinished_requests(self) -> bool:
        """Whether any request waits or runs."""
        return bool(self._requests)

    def stats(self) -> SchedulerStats:
        """Current gauges and counters."""
        return SchedulerStats(
            num_waiting=len(self.waiting),
            num_running=len(self.running),
            num_preemptions=self.num_preemptions,
            kv_cache_usage=self.block_manager.usage,
            prefix_cache_hit_rate=self.block_manager.prefix_hit_rate,
        )

    def longest_prompt_of_one_token(self) -> tuple[int, str]:
        """The longest prompt ``_check_new`` admits with ``max_tokens=1`` but for the one past
        ``max_model_len`` (its token would lie past it), and the limit that sets it, for messages."""
        longest, limit = self.max_seq_len - 1, f"max_model_len={self.max_model_len}"
        if self.max_seq_len < self.max_model_len:
            limit = f"the KV pool, which holds {self.max_seq_len} tokens of one sequence"
        budget = self.config.max_num_batched_tokens
        if not self.config.enable_chunked_prefill and budget < longest:
            longest, limit = budget, f"max_num_batched_tokens={budget} (chunked prefill is off)"
        return longest, limit

    def check_prompt_of_one_token(self, num_tokens: int) -> None:
        """Raise ``ValueError`` for a prompt longer than ``longest_prompt_of_one_token``'s, naming its limit."""
        longest, limit = self.longest_prompt_of_one_token()
        if num_tokens > longest:
            raise ValueError(f"a prompt of {num_tokens} tokens leaves no room for output within {limit}")

    def _check_new(self, request: Request) -> None:
        request_id, num_prompt_tokens = request.request_id, request.num_prompt_tokens
        if request_id in self._requests:
            raise ValueError(f"request_id={request_id!r} is already in use")
        if request.num_tokens != num_prompt_tokens or request.num_computed_tokens:
            raise ValueError(f"request {request_id!r} must be new: no output, nothing computed")
        if num_prompt_tokens == 0:
            raise ValueError("the prompt is empty")
        max_tokens = request.sampling_params.max_tokens
        # A prompt filling max_model_len may sample the one token after it (scoring the prompt
        # by its prompt logprobs): that token needs no position and no KV slot.
        if num_prompt_tokens > self.max_model_len or (num_prompt_tokens == self.max_model_len and max_tokens != 1):
            raise ValueError(
                f"a prompt of {num_prompt_tokens} tokens leaves no room for output "
                f"within max_model_len={self.max_model_len}"
            )
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens={max_tokens}: must be >= 1")
        if max_tokens is None and num_prompt_tokens >= self.max_seq_len:
            raise ValueError(
                f"a prompt of {num_prompt_tokens} tokens leaves no room for output "
                f"in the KV pool, which holds {self.max_seq_len} tokens of one sequence; enlarge the KV cache"
            )
        budget = self.config.max_num_batched_tokens
        if not self.config.enable_chunked_prefill and num_prompt_tokens > budget:
            raise ValueError(
                f"a prompt of {num_prompt_tokens} tokens exceeds "
                f"max_num_batched_tokens={budget} and chunked prefill is off"
            )
        # The K/V of every token but the last sampled one is stored.
        num_blocks = self.block_manager.num_blocks_for(self._final_num_tokens(request) - 1)
        if num_blocks > self.block_manager.num_usable_blocks:
            raise ValueError(
                f"a prompt of {num_prompt_tokens} tokens plus max_tokens={max_tokens} "
                f"needs {num_blocks} KV blocks but the pool has {self.block_manager.num_usable_blocks}; "
                "lower max_tokens or enlarge the KV cache"
            )

    def _final_num_tokens(self, request: Request) -> int:
        """Length at which the request finishes by length."""
        max_tokens = request.sampling_params.max_tokens
        if max_tokens is None:
            return self.max_seq_len
        # The token sampled after a prompt filling max_model_len (``_check_new``) lies past it.
        return min(request.num_prompt_tokens + max_tokens, max(self.max_model_len, request.num_prompt_tokens + 1))

    def _register(self, request: Request) -> None:
        self._requests[request.request_id] = request
        self._arrival_order[request.request_id] = next(self._arrival_counter)

    def _insert_running(self, request: Request) -> None:
        bisect.insort(self.running, request, key=lambda r: self._arrival_order[r.request_id])

    def _schedule_running(self, scheduled: list[ScheduledRequest], preempted_ids: list[str], budget: int) -> int:
        """Schedule running requests oldest first; returns the budget left."""
        index = 0
        needs: _SummedNeeds | None = None
        while index < len(self.running) and budget > 0 and len(scheduled) < self.config.max_num_seqs:
            request = self.running[index]
            assert request.num_tokens_to_compute > 0, "schedule() twice without update_from_output()"
            num_new_tokens = min(request.num_tokens_to_compute, budget)
            drafts = []
            if request.draft_token_ids:
                # Summed once a step: requests not yet scheduled change only by leaving the
                # end of the list (preempted), so the sums of those left stay true.
                needs = needs or self._summed_needs()
                num_younger = min(len(self.running) - index, self.config.max_num_seqs - len(scheduled)) - 1
                kept_tokens, kept_blocks = self._needs_of_younger(index, num_younger, budget - num_new_tokens, needs)
                waiting_tokens, waiting_blocks = self._first_chunk_of_waiting(
                    len(scheduled) + 1 + num_younger, budget - num_new_tokens - kept_tokens, kept_blocks
                )
                drafts = self._drafts_to_verify(
                    request, num_new_tokens, budget - kept_tokens - waiting_tokens, kept_blocks + waiting_blocks
                )
            if not drafts and not self._reserve_blocks(request, num_new_tokens, preempted_ids):
                break
            self._advance(scheduled, request, num_new_tokens, drafts)
            budget -= num_new_tokens + len(drafts)
            index += 1
        return budget

    def _summed_needs(self) -> _SummedNeeds:
        tokens, blocks = [0], [0]
        for request in self.running:
            total = self.block_manager.num_blocks_for(request.num_computed_tokens + request.num_tokens_to_compute)
            tokens.append(tokens[-1] + request.num_tokens_to_compute)
            blocks.append(blocks[-1] + max(0, total - len(request.block_ids)))
        return _SummedNeeds(tokens, blocks)

    def _needs_of_younger(self, index: int, num_younger: int, budget: int, needs: _SummedNeeds) -> tuple[int, int]:
        """The tokens and fresh blocks the ``num_younger`` running requests after ``running[index]``
        would take this step from ``budget``: what proposals must leave them (a younger request
        mid-prefill may need several blocks, and would otherwise be preempted for a guess)."""
        first, end = index + 1, index + 1 + num_younger
        num_tokens = needs.tokens[end] - needs.tokens[first]
        if num_tokens <= budget:  # each computes all it has left
            return num_tokens, needs.blocks[end] - needs.blocks[first]
        num_tokens = num_blocks = 0
        for request in self.running[index + 1 : index + 1 + num_younger]:
            # Each scheduled request computes at least one token; no more than the budget leaves.
            tokens = max(1, min(request.num_tokens_to_compute, budget - num_tokens))
            total = self.block_manager.num_blocks_for(request.num_computed_tokens + tokens)
            num_tokens += tokens
            num_blocks += max(0, total - len(request.block_ids))
        return num_tokens, num_blocks

    def _first_chunk_of_waiting(self, num_running: int, budget: int, num_kept_blocks: int) -> tuple[int, int]:
        """The tokens and free blocks the oldest waiting request would take this step, as plain
        decoding admits it: proposals leave them, or a full step of guesses would keep it waiting
        while the running requests last. Nothing when it could not be admitted anyway (no
        sequence slot after the ``num_running`` scheduled, no budget, no blocks).

        Sized first without its prefix-cache hit: a whole prompt so sized asks for at least the
        blocks admission takes; one cut by the budget may ask for fewer (the hit's unheld blocks
        leave the free ones too), but it then takes the whole budget, which leaves no room for
        proposals. Only when that does not fit is the hit looked up; if admission fits with
        it, every free block is kept: a block taken for a proposal could be one of the cached
        blocks the hit reads, evicted.
        """
        if not self.waiting or budget <= 0 or num_running >= self.config.max_num_seqs:
            return 0, 0
        request, manager = self.waiting[0], self.block_manager
        num_free = manager.num_free_blocks - num_kept_blocks
        num_tokens = self._num_admitted_tokens(request.num_tokens, budget)
        num_blocks = manager.num_blocks_for(num_tokens)
        if num_tokens and num_blocks <= num_free:
            return num_tokens, num_blocks
        if request.skip_prefix_cache:
            return 0, 0
        hit = self._prefix_hit(request)
        num_tokens = self._num_admitted_tokens(request.num_tokens - hit.num_cached_tokens, budget)
        if not hit.block_ids or num_tokens == 0:
            return 0, 0
        # Fresh blocks past the hit, and the hit's blocks no sequence holds (they leave the free ones).
        num_blocks = manager.num_blocks_for(hit.num_cached_tokens + num_tokens) - len(hit.block_ids)
        num_blocks += hit.num_unheld_blocks
        if num_blocks > num_free:
            return 0, 0
        return num_tokens, num_free

    def _prefix_hit(self, request: Request) -> PrefixHit:
        """``request``'s prefix-cache hit. The oldest waiting request is asked about once per
        proposing request and again at admission: its prompt's blocks are hashed once a step."""
        earlier = self._waiting_hit[1] if self._waiting_hit and self._waiting_hit[0] is request else None
        hit = self.block_manager.lookup_prefix(request.all_token_ids, earlier)
        self._waiting_hit = (request, hit)
        return hit

    def room_for_drafts(self, request: Request) -> int:
        """Most proposals ``request`` can verify: a step emits one token past those it keeps."""
        return self._final_num_tokens(request) - request.num_tokens - 1

    def _drafts_to_verify(self, request: Request, num_new_tokens: int, budget: int, num_kept_blocks: int) -> list[int]:
        """The proposals ``request`` computes after its ``num_new_tokens``, with their blocks reserved.

        Only a step reaching the last known token verifies proposals, and no more than
        ``budget`` allows, nor more than the request may still emit (a step emits one token
        past the proposals it keeps). Proposals never preempt, and leave ``num_kept_blocks``
        free blocks (what the younger running requests need this step): only the first ones
        that fit are verified.
        """
        drafts = request.draft_token_ids
        if not drafts or num_new_tokens != request.num_tokens_to_compute:
            return []
        manager = self.block_manager
        num_tokens = request.num_computed_tokens + num_new_tokens
        num_free_blocks = max(0, manager.num_free_blocks - num_kept_blocks)
        room = (len(request.block_ids) + num_free_blocks) * manager.block_size - num_tokens
        drafts = drafts[: max(0, min(budget - num_new_tokens, self.room_for_drafts(request), room))]
        if drafts:
            manager.append_slots(request.request_id, num_tokens + len(drafts))
        return drafts

    def _reserve_blocks(self, request: Request, num_new_tokens: int, preempted_ids: list[str]) -> bool:
        """Get blocks for ``num_new_tokens`` more tokens, preempting the newest running requests.

        The newest are behind ``request`` in ``running``, not yet scheduled this step. Returns
        False when ``request`` was itself the newest and preempted itself.
        """
        num_tokens = request.num_computed_tokens + num_new_tokens
        while self.block_manager.append_slots(request.request_id, num_tokens) is None:
            victim = self.running[-1]
            self._preempt(victim)
            preempted_ids.append(victim.request_id)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.block_manager.free(request.request_id)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.block_ids = []
        request.draft_token_ids = []
        request.num_preemptions += 1
        self.num_preemptions += 1
        # Back in arrival order: usually at the front, but a forked child arrived when it was
        # forked, possibly after requests still waiting.
        bisect.insort(self.waiting, request, key=lambda r: self._arrival_order[r.request_id])

    def _schedule_waiting(self, scheduled: list[ScheduledRequest], budget: int) -> None:
        """Admit waiting requests in arrival order while budget, sequence slots and blocks last."""
        # Admission runs only when every running request was scheduled (the running pass stops
        # early only on an empty budget, a full batch or a preemption), so ``scheduled`` counts
        # the whole running batch.
        while self.waiting and budget > 0 and len(scheduled) < self.config.max_num_seqs:
            request = self.waiting[0]
            prefix_hit = None if request.skip_prefix_cache else self._prefix_hit(request)
            num_cached_tokens = prefix_hit.num_cached_tokens if prefix_hit is not None else 0
            num_new_tokens = self._num_admitted_tokens(request.num_tokens - num_cached_tokens, budget)
            if num_new_tokens == 0:
                return
            # A preempted request recomputing finds its own blocks: no hit of the prompt cache.
            table = self.block_manager.allocate(
                request.request_id,
                num_cached_tokens + num_new_tokens,
                prefix_hit,
                counts_as_query=request.num_preemptions == 0,
            )
            if table is None:
                return
            self.waiting.popleft()
            request.block_ids = table
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_cached_tokens
            if request.num_preemptions == 0:
                request.num_cached_tokens = num_cached_tokens
            self._insert_running(request)
            self._advance(scheduled, request, num_new_tokens)
            budget -= num_new_tokens

    def _num_admitted_tokens(self, num_to_compute: int, budget: int) -> int:
        """Tokens a waiting request computes in its first step; 0 when it must keep waiting."""
        if num_to_compute <= budget:
            return num_to_compute
        # A recompute after preemption (prompt plus output) may exceed the whole budget; it is
        # chunked even with chunked prefill off, or it would never run again.
        if self.config.enable_chunked_prefill or num_to_compute > self.config.max_num_batched_tokens:
            return budget
        return 0

    def _advance(
        self, scheduled: list[ScheduledRequest], request: Request, num_new_tokens: int, drafts: list[int] | None = None
    ) -> None:
        """Add ``request``'s share of the step to ``scheduled``, then advance it: an interrupted
        ``schedule`` has recorded every advance it made, and so can take it back."""
        start = request.num_computed_tokens
        end = start + num_new_tokens
        drafts = drafts or []
        scheduled.append(
            ScheduledRequest(
                request=request,
                num_computed_tokens=start,
                num_new_tokens=num_new_tokens + len(drafts),
                is_sampling=end == request.num_tokens,
                token_ids=request.all_token_ids[start:end] + drafts,
                block_ids=list(request.block_ids),
                num_draft_tokens=len(drafts),
            )
        )
        # Proposals count as computed until the step's result says how many were kept.
        request.num_computed_tokens = end + len(drafts)
        request.draft_token_ids = []

    def _append_sampled(self, request: Request, token_ids: list[int]) -> bool:
        """Append sampled tokens up to the length limit.

        Returns whether the request reached it. Tokens appended beyond the computed ones are
        simply the next step's tokens to compute.
        """
        assert token_ids, f"no sampled token for {request.request_id!r}"
        final_num_tokens = self._final_num_tokens(request)
        for token_id in token_ids:
            request.append_output_token(token_id)
            if request.num_tokens >= final_num_tokens:
                return True
        return False

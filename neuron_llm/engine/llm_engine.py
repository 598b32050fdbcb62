"""The synchronous engine: requests in, one flat step at a time, outputs out.

Each ``step()`` asks the scheduler for this step's tokens, has the model runner pack and
run them and sample (on the device) the requests that reached the end of their known
tokens, and turns the new tokens into text (stop tokens and strings are judged here).
``LLM`` drives it until every request finishes; ``AsyncLLM`` drives it from a thread of
its own.
"""

from __future__ import annotations

import collections
import itertools
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

import torch
from transformers import PreTrainedTokenizerBase

from neuron_llm.config import EngineConfig
from neuron_llm.detokenizer import IncrementalDetokenizer, TokenTexts
from neuron_llm.engine.model_runner import ModelRunner, StepResult
from neuron_llm.engine.request import Request, RequestStatus
from neuron_llm.engine.scheduler import ScheduledRequest, Scheduler, SchedulerOutput, SchedulerStats
from neuron_llm.engine.speculative import Proposer, make_proposer
from neuron_llm.interrupts import interrupt_after
from neuron_llm.loader.tokenizer import bad_word_token_ids, checked_unicode
from neuron_llm.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from neuron_llm.parallel.executor import Executor
from neuron_llm.sample import LogprobsTensors, RowState, compute_prompt_logprobs, make_generator
from neuron_llm.sample.rejection import expand_rows
from neuron_llm.sample.sampler import NoTokenLeftError
from neuron_llm.sample.structured import Grammar, GrammarCompiler, GrammarError
from neuron_llm.sampling_params import SamplingParams, StructuredOutputsParams, is_integral, truncated_prompt
from neuron_llm.worker import placeholder

logger = logging.getLogger(__name__)


@dataclass
class _Sequence:
    """Engine-side state of one of a request's ``n`` completions."""

    index: int
    request: Request
    detokenizer: IncrementalDetokenizer | None
    """None when the model has no tokenizer (token-id prompts only; the text stays empty)."""
    generator: torch.Generator | None
    logprobs: list[dict[int, Logprob]] | None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    grammar: Grammar | None = None
    """Where the sequence is in its structured output's grammar; None without one."""
    num_reported_tokens: int = 0
    num_reported_chars: int = 0
    """What earlier "delta" outputs held of the sequence (``SamplingParams.output_kind``)."""
    is_end_reported: bool = False

    @property
    def text(self) -> str:
        return self.detokenizer.output_text if self.detokenizer else ""

    def completion(self, num_tokens_before: int = 0, num_chars_before: int = 0) -> CompletionOutput:
        """The sequence's output after its first ``num_tokens_before`` tokens and
        ``num_chars_before`` characters (by default all of it)."""
        return CompletionOutput(
            index=self.index,
            text=self.text[num_chars_before:],
            token_ids=self.request.output_token_ids[num_tokens_before:],
            cumulative_logprob=self.cumulative_logprob if self.logprobs is not None else None,
            logprobs=self.logprobs[num_tokens_before:] if self.logprobs is not None else None,
            finish_reason=self.finish_reason,  # type: ignore[arg-type]
            stop_reason=self.stop_reason,
        )

    def delta(self) -> CompletionOutput | None:
        """What the sequence gained since its last delta; None when nothing (its end included)."""
        num_tokens, num_chars = self.request.num_output_tokens, len(self.text)
        is_unchanged = (num_tokens, num_chars) == (self.num_reported_tokens, self.num_reported_chars)
        if is_unchanged and (self.is_end_reported or self.finish_reason is None):
            return None
        completion = self.completion(self.num_reported_tokens, self.num_reported_chars)
        self.num_reported_tokens, self.num_reported_chars = num_tokens, num_chars
        self.is_end_reported = self.finish_reason is not None
        return completion


@dataclass
class _RequestGroup:
    """A user request: its prompt and its ``n`` sequences (scheduler requests)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    sequences: list[_Sequence]
    metrics: RequestMetrics
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    pending_forks: list[Request] = field(default_factory=list)
    """Sequences 1..n-1, forked from sequence 0 once its prompt is in the KV cache."""
    bad_words_token_ids: list[list[int]] = field(default_factory=list)
    """``params.bad_words`` as token ids (``bad_word_token_ids``)."""

    @property
    def finished(self) -> bool:
        return not self.pending_forks and all(seq.finish_reason is not None for seq in self.sequences)

    def num_cached_tokens(self) -> int | None:
        """The first sequence's prompt tokens found in the prefix cache; None before it ran."""
        if self.metrics.first_scheduled_time is None:
            return None
        return self.sequences[0].request.num_cached_tokens


def _restore(generator_states: list[tuple[torch.Generator, torch.Tensor]]) -> None:
    for generator, state in generator_states:
        generator.set_state(state)


@dataclass(frozen=True)
class _StepRead:
    """What a launched step gave, read to the host; reading changes no request."""

    token_ids: list[list[int]]
    """Per sampling entry, its new token ids."""
    logprobs: list[list[dict[int, Logprob] | None]]
    """Per sampling entry, its new tokens' logprobs (None where not asked for)."""
    prompt_logprobs: list[tuple[_RequestGroup, list[dict[int, Logprob]]]]
    """The prompt positions the step scored, for each group that asked, to append to its list."""
    num_drafted: int = 0
    num_accepted: int = 0


@dataclass
class _LaunchedStep:
    """A step on its way through the device, and the copy of its sampled tokens to the host."""

    scheduled: SchedulerOutput
    sampling: list[ScheduledRequest]
    """The entries that sample, in the order of the sampled rows."""
    rows: list[RowState]
    result: StepResult
    num_outputs_before: list[int]
    """Per sampling entry, its request's output tokens when the step was launched: those after
    them once the scheduler took the step's tokens are the step's."""
    generator_states: list[tuple[torch.Generator, torch.Tensor]]
    """The seeded rows' generators before the step drew from them, restored when it is rewound."""
    dead_ends: dict[int, tuple[int, ValueError]]
    """Sampling entry -> the first of its logits rows (0, or past that many of its proposals)
    whose constraints leave no token to draw, and the error that fails its request if its
    token comes from that row."""
    host_token_ids: torch.Tensor | None = field(init=False, default=None)
    host_logprobs: LogprobsTensors | None = field(init=False, default=None)
    host_num_accepted: torch.Tensor | None = field(init=False, default=None)
    on_host: torch.cuda.Event | None = field(init=False, default=None)
    """Recorded after the copies to the host (CUDA); reading before it fires would read garbage."""

    def __post_init__(self) -> None:
        sampled = self.result.sampled
        if sampled is None:
            return
        # From CUDA, a non-blocking copy lands in pinned memory and only the event says when.
        self.host_token_ids = sampled.token_ids.to("cpu", non_blocking=True)
        if sampled.logprobs is not None:
            self.host_logprobs = sampled.logprobs.to_host()
        if sampled.num_accepted is not None:
            self.host_num_accepted = sampled.num_accepted.to("cpu", non_blocking=True)
        if sampled.token_ids.is_cuda:
            self.on_host = torch.cuda.Event()
            # The copies' stream: this thread's current device may be another GPU.
            self.on_host.record(torch.cuda.current_stream(sampled.token_ids.device))


LATENCIES = ("time_to_first_token", "inter_token_latency", "request_queue_time", "e2e_request_latency")
"""The latency samples ``EngineStats`` carries, in seconds: arrival to first token; between
two steps that gave a request tokens; arrival to first scheduled; arrival to finished."""

MAX_KEPT_LATENCIES = 65536
"""Latency samples of each kind kept between two ``stats()`` calls (the latest), so that an
engine nobody asks, as offline ``LLM.generate`` runs it, stays bounded."""


@dataclass(frozen=True)
class EngineStats:
    """Scheduler gauges plus per-request latencies (``LATENCIES``) recorded since the last call."""

    scheduler: SchedulerStats
    time_to_first_token: list[float]
    inter_token_latency: list[float]
    request_queue_time: list[float]
    e2e_request_latency: list[float]
    num_prompt_tokens: int
    num_generation_tokens: int
    num_compiled_graphs: int
    """Graphs the backend compiled (XLA: one per bucket after warm-up; eager: 0)."""
    num_draft_tokens: int = 0
    """Proposed tokens verified so far (speculative decoding)."""
    num_accepted_tokens: int = 0
    """Of those, the tokens verification kept (the proposer's hits: a stop before some of
    them in the same step still counts them)."""


class LLMEngine:
    """Continuous batching over a paged KV cache, one flat step at a time.

    Args:
        config: the engine configuration (scheduler and cache parts are read here).
        executor: runs a step on every rank and returns rank 0's logits.
        tokenizer: the model's tokenizer, for text prompts and detokenization.
        eos_token_ids: tokens that end a sequence unless ``ignore_eos``.
    """

    def __init__(
        self,
        config: EngineConfig,
        executor: Executor,
        tokenizer: PreTrainedTokenizerBase | None,
        eos_token_ids: Sequence[int],
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.token_texts = TokenTexts(tokenizer)
        """Each token's text alone, cached for the engine's life: logprobs' ``decoded_token`` and
        the server's logprobs."""
        self._decoded_token = self.token_texts if tokenizer is not None else None
        self.eos_token_ids = frozenset(eos_token_ids)
        self._sorted_eos_token_ids = sorted(self.eos_token_ids)
        self._tokenizer_eos = None if tokenizer is None else tokenizer.eos_token_id
        self.runner = ModelRunner(config, executor)
        self.scheduler = Scheduler(config.cache, config.scheduler, executor.num_kv_blocks)
        self._groups: dict[str, _RequestGroup] = {}
        self._sequences: dict[str, tuple[_RequestGroup, _Sequence]] = {}
        self._request_counter = itertools.count()
        self._latencies = latency_samples()
        self._num_prompt_tokens = 0
        self._num_generation_tokens = 0
        self._num_draft_tokens = 0
        self._num_accepted_tokens = 0
        self._async_scheduling = config.async_scheduling
        self._in_flight: _LaunchedStep | None = None
        self._output_readers: set[str] = set()
        """Requests whose penalties, bad words or grammar need every token on the host before the next step."""
        self._failures: list[tuple[str, Exception]] = []
        self._held_outputs: list[RequestOutput] = []
        """A step's outputs that a Ctrl-C held back (``step``), for the next step to return."""
        self.proposer: Proposer | None = make_proposer(
            config, executor.num_kv_blocks, tokenizer, executor.worker.device
        )
        self._grammars = (
            None
            if tokenizer is None
            else GrammarCompiler(tokenizer, config.model.vocab_size, self._sorted_eos_token_ids)
        )
        """Offers each decoding sequence's next tokens before a step (speculative decoding); None: off."""

    # -- requests -----------------------------------------------------------------------

    def add_request(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams,
        request_id: str | None = None,
        arrival_time: float | None = None,
    ) -> str:
        """Queue a request; returns its id. Raises ``ValueError`` naming what is wrong with it.

        A bad request is refused alone: nothing already queued or running is touched.
        ``arrival_time`` (``time.monotonic()``; default now) is when the request arrived: a
        front end that holds requests before the engine takes them (``AsyncLLM``, between
        steps) passes the time it got them, so that its latencies count the wait, as vLLM's.
        """
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be SamplingParams, not {type(params).__name__}")
        request_id = self.unused_request_id(params.n) if request_id is None else request_id
        if request_id in self._groups:
            raise ValueError(f"request_id={request_id!r} is already in use")
        prompt_text, prompt_ids = self.tokenize_prompt(prompt)
        if params.truncate_prompt_tokens is not None:
            prompt_ids = truncated_prompt(prompt_ids, params.truncate_prompt_tokens, self.scheduler.max_seq_len)
        bad_words_token_ids = self._sampling_token_ids(params)
        sequences = [self._new_sequence(request_id, i, prompt_ids, params) for i in range(params.n)]
        if params.structured_outputs is not None:
            for seq in sequences:
                seq.grammar = self._grammar(params)
        # An n > 1 request's sequences are named "{request_id}#{index}", which another request
        # may already be called (or the reverse).
        taken = [seq.request.request_id for seq in sequences if seq.request.request_id in self._sequences]
        if taken:
            raise ValueError(f"request_id={request_id!r}: its sequence id {taken[0]!r} is already in use")
        first = sequences[0].request
        group = _RequestGroup(
            request_id=request_id,
            prompt=prompt_text,
            prompt_token_ids=prompt_ids,
            params=params,
            sequences=sequences,
            metrics=RequestMetrics(arrival_time=first.arrival_time if arrival_time is None else arrival_time),
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None,
            pending_forks=[seq.request for seq in sequences[1:]],
            bad_words_token_ids=bad_words_token_ids,
        )
        # Known here before the scheduler runs it, so that a Ctrl-C at any point leaves either
        # no trace of the request or one the engine can step and abort.
        self._groups[request_id] = group
        for seq in sequences:
            self._sequences[seq.request.request_id] = (group, seq)
        try:
            self.scheduler.add_request(first)  # raises ValueError for lengths the engine cannot serve
        except BaseException:
            self.scheduler.abort(first.request_id)  # in case it took the request before the interrupt
            del self._groups[request_id]
            for seq in sequences:
                del self._sequences[seq.request.request_id]
            raise
        if params.has_penalties or params.bad_words or params.structured_outputs:
            self._output_readers.add(request_id)
        return request_id

    def _sampling_token_ids(self, params: SamplingParams) -> list[list[int]]:
        """Check the token ids ``params`` names against the vocabulary; returns its bad words'."""
        vocab_size = self.config.model.vocab_size
        for name, token_ids in (("logit_bias", params.logit_bias), ("allowed_token_ids", params.allowed_token_ids)):
            outside = [token_id for token_id in token_ids or () if token_id >= vocab_size]
            if outside:
                # Checked here: a token id past the logits' row would fault the device, not raise.
                raise ValueError(f"{name}={outside[:5]}: token ids not in the vocabulary [0, {vocab_size})")
        words = self._bad_words_token_ids(params)
        if params.allowed_token_ids:
            # A first step whose every allowed token is banned or held back has nothing to sample.
            banned = {word[0] for word in words if len(word) == 1}
            ends = set(params.stop_token_ids or ()) | set(self.eos_token_ids) if params.min_tokens else set()
            allowed = set(params.allowed_token_ids)
            if (banned | ends).issuperset(allowed):
                held_back = f"ends the sequence while min_tokens={params.min_tokens} holds the ends back"
                if allowed <= banned:
                    why = "bad_words ban each"
                elif allowed & banned:
                    why = f"bad_words ban some, and each other one {held_back}"
                else:
                    why = f"each {held_back}"
                raise ValueError(
                    f"allowed_token_ids={params.allowed_token_ids[:5]}: {why}, so no token could be generated"
                )
        return words

    def _bad_words_token_ids(self, params: SamplingParams) -> list[list[int]]:
        if not params.bad_words:
            return []
        if self.tokenizer is None:
            raise ValueError(
                f"bad_words={params.bad_words[:5]!r}: bad words need a tokenizer, which this model lacks; "
                "use logit_bias"
            )
        words = bad_word_token_ids(self.tokenizer, params.bad_words)
        vocab_size = self.config.model.vocab_size
        outside = [token_id for word in words for token_id in word if token_id >= vocab_size]
        if outside:
            raise ValueError(
                f"bad_words={params.bad_words[:5]!r}: their tokens {outside[:5]} are not in the vocabulary "
                f"[0, {vocab_size})"
            )
        return words

    def compile_structure(self, structure: StructuredOutputsParams) -> None:
        """Compile ``structure``'s grammar ahead of the request that has it, off the engine's
        thread if need be (the server does, before queueing the request): ``add_request`` then
        only copies it. Raises ``ValueError`` naming what is wrong with it."""
        self._grammar_compiler().compile(structure)

    def _grammar(self, params: SamplingParams) -> Grammar:
        assert params.structured_outputs is not None
        return self._grammar_compiler().matcher(params.structured_outputs)

    def _grammar_compiler(self) -> GrammarCompiler:
        if self._grammars is None:
            raise ValueError("structured_outputs need a tokenizer, which this model lacks")
        return self._grammars

    def unused_request_id(self, n: int = 1) -> str:
        """An id for a request of ``n`` completions that no request (nor any of their sequences) holds."""
        # Callers may name requests too, so a counter value (or its sequences' ids) can be taken.
        while True:
            request_id = str(next(self._request_counter))
            seq_ids = [request_id] if n == 1 else [f"{request_id}#{i}" for i in range(n)]
            if request_id not in self._groups and not any(s in self._sequences for s in seq_ids):
                return request_id

    def abort(self, request_id: str) -> bool:
        """Stop a request in any state and free its blocks; False if unknown or finished."""
        # Its outputs a Ctrl-C held back go too: its id may be used again.
        self._held_outputs = [output for output in self._held_outputs if output.request_id != request_id]
        group = self._groups.get(request_id)
        if group is None:
            return False
        # The scheduler first: an abort cut short (Ctrl-C) leaves the group known, to abort again.
        for seq in group.sequences:
            self.scheduler.abort(seq.request.request_id)
        del self._groups[request_id]
        self._output_readers.discard(request_id)
        for seq in group.sequences:
            self._sequences.pop(seq.request.request_id, None)
        return True

    def has_unfinished_requests(self) -> bool:
        # Outputs held back by a Ctrl-C (``step``) include finished requests' last ones.
        return bool(self._groups or self._held_outputs)

    def has_first_token(self, request_id: str) -> bool:
        """Whether the running request ``request_id`` has generated a token; False for an unknown one."""
        group = self._groups.get(request_id)
        return group is not None and group.metrics.first_token_time is not None

    def take_failures(self) -> list[tuple[str, Exception]]:
        """The requests that failed alone since the last call, each with its error: judging one
        of their tokens raised, so they were aborted and the others went on. A caller of
        ``step`` that waits for outputs checks this after each step."""
        failures, self._failures = self._failures, []
        return failures

    def stats(self) -> EngineStats:
        """Gauges now, and latencies recorded since the previous call (then cleared)."""
        stats = EngineStats(
            scheduler=self.scheduler.stats(),
            **{name: list(samples) for name, samples in self._latencies.items()},
            num_prompt_tokens=self._num_prompt_tokens,
            num_generation_tokens=self._num_generation_tokens,
            num_compiled_graphs=self.runner.executor.worker.num_compiled_graphs(),
            num_draft_tokens=self._num_draft_tokens,
            num_accepted_tokens=self._num_accepted_tokens,
        )
        self._latencies = latency_samples()
        return stats

    @property
    def is_alive(self) -> bool:
        """Whether steps can run: false once a tensor-parallel rank failed (the group is then shut down)."""
        return self.runner.executor.is_alive

    # -- one step -----------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one step; returns an output for every request that finished, and for every
        "cumulative" or "delta" one (``SamplingParams.output_kind``) that progressed.

        With async scheduling (``EngineConfig.async_scheduling``) the step is launched before
        the tokens of the one before it are read, and the outputs returned are that earlier
        step's: the device runs one step while the host does the bookkeeping of the last.

        A Ctrl-C while a step's tokens are judged is held back until every request has taken
        its tokens, then raised; that step's outputs come with the next step's.
        """
        outputs = self._step()
        held, self._held_outputs = self._held_outputs, []
        return held + outputs

    def _step(self) -> list[RequestOutput]:
        if self._in_flight is not None and not self._overlaps():
            # Read before it leaves _in_flight: after a failed read the next step reads it again.
            in_flight_read = self._read(self._in_flight)
            in_flight, self._in_flight = self._in_flight, None
            return self._judge(None, (in_flight, in_flight_read), None)
        if self.proposer is not None:
            self._propose(self.proposer)
        scheduled = launched = None
        try:
            scheduled = self.scheduler.schedule()
            overlaps = self._overlaps()
            launched = None if scheduled.is_empty else self._launch(scheduled)
            read = self._read(launched) if launched is not None and not overlaps else None
            previous = None if self._in_flight is None else (self._in_flight, self._read(self._in_flight))
        except BaseException:
            # The step's tokens never came back: its requests compute them again in a later
            # step, drawing what they would have drawn, and a step in flight is read again
            # then (for the other callers of a shared engine); this caller sees the error (a
            # Ctrl-C too, even one that cut schedule() short).
            if launched is not None:
                _restore(launched.generator_states)
            if scheduled is not None:  # else schedule() took back its own advance
                self.scheduler.rewind(scheduled)
            raise
        self._in_flight = None
        return self._judge(launched, previous, read)

    def _judge(
        self,
        launched: _LaunchedStep | None,
        previous: tuple[_LaunchedStep, _StepRead] | None,
        read: _StepRead | None,
    ) -> list[RequestOutput]:
        """Judge the step in flight before (``previous``), count the one just ``launched``,
        and judge it too if it was ``read``; with Ctrl-C held back: cut short, the rows not
        yet judged would keep placeholder ids, or tokens never detokenized nor stop-checked."""
        with interrupt_after() as interrupted:
            try:
                outputs = [] if previous is None else self._complete(*previous)
            finally:
                # Counted even when judging the step before failed, so that later steps go on.
                if launched is not None:
                    self._count_launched(launched, read)
            if launched is not None and read is not None:
                outputs += self._complete(launched, read)
        if interrupted:
            self._held_outputs += outputs  # after those an earlier Ctrl-C held, if not yet returned
            raise KeyboardInterrupt
        return outputs

    def _count_launched(self, launched: _LaunchedStep, read: _StepRead | None) -> None:
        """Give the scheduler the launched step's tokens: ``read``'s, or (still running) a
        placeholder each, which the device fills in for the next step and the host replaces
        once it has read the token (``_complete``)."""
        if read is not None:
            sampled = {entry.request.request_id: ids for entry, ids in zip(launched.sampling, read.token_ids)}
        else:
            sampled = {entry.request.request_id: [placeholder(row)] for row, entry in enumerate(launched.sampling)}
            self._in_flight = launched
        self.scheduler.update_from_output(launched.scheduled, sampled)

    def _propose(self, proposer: Proposer) -> None:
        """Offer each decoding request's next tokens, for this step to verify.

        Not to seeded sampled requests: how many proposals a step verifies depends on the
        batch (the budget and blocks the others leave), and with it the random draws, so a
        seed would no longer fix the tokens. Without proposals they draw what plain
        decoding draws.
        """
        proposing = []
        for request in self.scheduler.running:
            if not request.num_output_tokens or request.num_tokens_to_compute != 1:
                continue
            group, seq = self._sequences[request.request_id]
            # A grammar's mask for each proposal would need it advanced past the ones before.
            if (seq.generator is None or group.params.is_greedy) and seq.grammar is None:
                proposing.append(request)
        propose_all = getattr(proposer, "propose_all", None)
        if propose_all is not None:
            sequences = [request.token_array() for request in proposing]
            rooms = [self.scheduler.room_for_drafts(request) for request in proposing]
            drafts = propose_all(sequences, rooms) if proposing else []
        else:
            drafts = [proposer.propose(request.token_array()) for request in proposing]
        for request, draft in zip(proposing, drafts, strict=True):
            request.draft_token_ids = draft

    def _overlaps(self) -> bool:
        # Penalties, bad words and grammars read the output tokens' values on the host: they wait for each step.
        return self._async_scheduling and not self._output_readers

    def _launch(self, scheduled: SchedulerOutput) -> _LaunchedStep:
        """Start the step on the device and the copy of its sampled tokens to the host."""
        now = time.monotonic()
        for entry in scheduled.scheduled:
            group, _ = self._sequences[entry.request.request_id]
            if group.metrics.first_scheduled_time is None:
                group.metrics.first_scheduled_time = now
                self._latencies["request_queue_time"].append(now - group.metrics.arrival_time)
        sampling = [entry for entry in scheduled.scheduled if entry.is_sampling]
        rows = [self._row_state(entry) for entry in sampling]
        # Judged now, while each row's output is the one it samples after.
        dead_ends = {i: found for i, entry in enumerate(sampling) if (found := self._dead_end(entry, rows[i]))}
        sampled_before = None
        if self._in_flight is not None and self._in_flight.result.sampled is not None:
            sampled_before = self._in_flight.result.sampled.token_ids
        generator_states = [(row.generator, row.generator.get_state()) for row in rows if row.generator is not None]
        try:
            result = self.runner.execute(
                scheduled, self._wants_prompt_logprobs, rows, self._sorted_eos_token_ids, sampled_before
            )
        except BaseException:
            _restore(generator_states)
            raise
        num_outputs_before = [entry.request.num_output_tokens for entry in sampling]
        return _LaunchedStep(scheduled, sampling, rows, result, num_outputs_before, generator_states, dead_ends)

    def _complete(self, launched: _LaunchedStep, read: _StepRead) -> list[RequestOutput]:
        """Judge a launched step's tokens, as ``read``: stops, forks, outputs."""
        self._num_draft_tokens += read.num_drafted
        self._num_accepted_tokens += read.num_accepted
        for group, scored in read.prompt_logprobs:
            assert group.prompt_logprobs is not None
            group.prompt_logprobs.extend(scored)
        touched: dict[str, _RequestGroup] = {}
        step_outputs = zip(launched.sampling, launched.num_outputs_before, read.token_ids, read.logprobs)
        for row, (entry, num_before, ids, logprobs) in enumerate(step_outputs):
            request = entry.request
            if request.output_token_ids and request.output_token_ids[-1] == placeholder(row):
                request.replace_last_output_token(ids[0])
            found = self._live_sequence(request)
            if found is None or found[1].finish_reason is not None:
                continue  # aborted, or stopped by the step before (async scheduling ran it once more)
            group, seq = found
            try:
                dead_end = launched.dead_ends.get(row)
                if dead_end is not None and len(ids) > dead_end[0]:
                    # Its last token was drawn from logits all -inf: it fails, unless the tokens
                    # before that one (kept proposals) end the sequence first.
                    position, error = dead_end
                    if position:
                        self._take_tokens(group, seq, ids[:position], logprobs[:position], num_before)
                    if seq.finish_reason is None:
                        raise error
                else:
                    self._take_tokens(group, seq, ids, logprobs, num_before)
            except Exception as error:
                # That request fails alone: every other row of the step is still judged.
                if isinstance(error, (GrammarError, NoTokenLeftError)):
                    logger.warning("request %s failed: %s", group.request_id, error)
                else:
                    logger.exception("request %s failed while its tokens were judged", group.request_id)
                self.abort(group.request_id)
                self._failures.append((group.request_id, error))
                touched.pop(group.request_id, None)
                continue
            touched[group.request_id] = group
        for group in touched.values():
            self._fork_pending(group)
        reports = (self._finish_or_report(group) for group in touched.values())
        return [output for output in reports if output is not None]

    def _take_tokens(
        self,
        group: _RequestGroup,
        seq: _Sequence,
        ids: list[int],
        logprobs: list[dict[int, Logprob] | None],
        num_before: int,
    ) -> None:
        request = seq.request
        # The scheduler appended the step's tokens up to the length limit.
        num_taken = min(len(ids), request.num_output_tokens - num_before)
        self._record_latency(group, seq)
        for i in range(num_taken):
            self._process_token(group, seq, ids[i], logprobs[i], num_before + i + 1, is_last=i == num_taken - 1)
            if seq.finish_reason is not None:
                # A stop among a step's tokens: the ones after it were never generated.
                request.truncate_output(num_before + i + 1)
                break

    def _live_sequence(self, request: Request) -> tuple[_RequestGroup, _Sequence] | None:
        """The group and sequence of ``request``; None once it was aborted, even if its id is in use again."""
        found = self._sequences.get(request.request_id)
        return found if found is not None and found[1].request is request else None

    def _wants_prompt_logprobs(self, entry: ScheduledRequest) -> bool:
        group, seq = self._sequences[entry.request.request_id]
        return (
            group.prompt_logprobs is not None
            and seq.index == 0
            and entry.num_computed_tokens < len(group.prompt_token_ids) - 1
        )

    def _row_state(self, entry: ScheduledRequest) -> RowState:
        group, seq = self._sequences[entry.request.request_id]
        request = entry.request
        return RowState(
            request.sampling_params,
            request.prompt_token_ids,
            request.output_token_ids,
            seq.generator,
            group.bad_words_token_ids,
            None if seq.grammar is None else seq.grammar.allowed(),
        )

    def _dead_end(self, entry: ScheduledRequest, row: RowState) -> tuple[int, ValueError] | None:
        """The first of ``entry``'s logits rows (``row``, then one past each proposal it
        verifies) that forbids every token, and the error to fail its request with; else None."""
        if not row.bad_words_token_ids and row.grammar_mask is None:
            return None  # allowed_token_ids against min_tokens alone: refused when the request was added
        drafts = entry.token_ids[len(entry.token_ids) - entry.num_draft_tokens :] if entry.num_draft_tokens else []
        for position, expanded in enumerate(expand_rows([row], [drafts])):
            if expanded.forbids_every_token(self.config.model.vocab_size, self._sorted_eos_token_ids):
                return position, self._no_token_error(entry, expanded)
        return None

    def _no_token_error(self, entry: ScheduledRequest, row: RowState) -> ValueError:
        """Why ``row`` has no token left, naming what forbids them (``RowState.forbids_every_token``)."""
        params, grammar = row.params, self._sequences[entry.request.request_id][1].grammar
        if grammar is not None and (failure := grammar.failure()) is not None:
            return failure  # given up on, its mask allows EOS alone
        position = f"output token {len(row.output_token_ids) + 1}"
        others = ["allowed_token_ids"] if params.allowed_token_ids else []
        if row.is_min_tokens_unmet and not row.forbids_every_token(
            self.config.model.vocab_size, self._sorted_eos_token_ids, hold_ends=False
        ):
            others.append(f"min_tokens={params.min_tokens}")
        if not row.banned_token_ids():
            assert grammar is not None, "only a grammar or bad words can take a row's last token"
            forbid = f"only tokens that {' and '.join(others)} forbid" if others else "no token"
            return GrammarError(grammar.field, f"allows {forbid} at {position}")
        if grammar is not None:
            others.insert(0, f"structured_outputs.{grammar.field}")
        left = f"left by {' and '.join(others)}" if others else "of the vocabulary"
        return NoTokenLeftError(
            f"bad_words={params.bad_words[:5]!r}: at {position} they ban every token {left}, so none could be generated"
        )

    def _read(self, launched: _LaunchedStep) -> _StepRead:
        """The step's new tokens and their logprobs, and the prompt logprobs it scored.

        Everything a step's results may fail on (the device, memory for the scoring) fails
        here, before any request changed: the step can be read again, or rewound.
        """
        prompt_logprobs = self._score_prompts(launched.scheduled, launched.result.prompt_logits)
        if launched.host_token_ids is None:
            return _StepRead([], [], prompt_logprobs)
        if launched.on_host is not None:
            launched.on_host.synchronize()
        token_ids = launched.host_token_ids.tolist()  # the one host read per step
        # Rows per entry: one, or each proposal's and one more (their tokens, if all are kept).
        row_counts = [entry.num_draft_tokens + 1 for entry in launched.sampling]
        num_new = [1] * len(row_counts)
        num_drafted = num_accepted = 0
        if launched.host_num_accepted is not None:
            accepted = launched.host_num_accepted.tolist()
            num_new = [n + 1 for n in accepted]
            num_drafted, num_accepted = sum(entry.num_draft_tokens for entry in launched.sampling), sum(accepted)
        logprobs: list[dict[int, Logprob] | None] = [None] * len(token_ids)
        if launched.host_logprobs is not None:
            counts = [row.params.logprobs for row, n in zip(launched.rows, row_counts) for _ in range(n)]
            logprobs = launched.host_logprobs.to_dicts(counts, self._decoded_token)
        starts = list(itertools.accumulate(row_counts, initial=0))
        return _StepRead(
            [token_ids[start : start + n] for start, n in zip(starts, num_new)],
            [logprobs[start : start + n] for start, n in zip(starts, num_new)],
            prompt_logprobs,
            num_drafted,
            num_accepted,
        )

    def _score_prompts(
        self, scheduled: SchedulerOutput, prompt_logits: list[torch.Tensor | None]
    ) -> list[tuple[_RequestGroup, list[dict[int, Logprob]]]]:
        scored_groups = []
        for entry, logits in zip(scheduled.scheduled, prompt_logits):
            found = self._live_sequence(entry.request)
            if logits is None or found is None:
                continue
            group, _ = found
            assert group.prompt_logprobs is not None and group.params.prompt_logprobs is not None
            # Row i scores prompt token start + i + 1; a recompute after preemption repeats
            # positions already recorded, which are skipped.
            start = entry.num_computed_tokens
            num_recorded = len(group.prompt_logprobs) - 1
            logits = logits[max(0, num_recorded - start) :]
            start = max(start, num_recorded)
            if logits.shape[0] == 0:
                continue
            next_ids = torch.tensor(
                group.prompt_token_ids[start + 1 : start + 1 + logits.shape[0]], device=logits.device
            )
            scored = compute_prompt_logprobs(logits, next_ids, max(group.params.prompt_logprobs, 1))
            dicts = scored.to_dicts([group.params.prompt_logprobs] * logits.shape[0], self._decoded_token)
            scored_groups.append((group, dicts))
        return scored_groups

    def _record_latency(self, group: _RequestGroup, seq: _Sequence) -> None:
        """Time a step that gave ``seq`` tokens (as in vLLM, one inter-token latency per step,
        however many tokens it adds)."""
        now = time.monotonic()
        metrics = group.metrics
        if metrics.first_token_time is None:
            metrics.first_token_time = now
            self._latencies["time_to_first_token"].append(now - metrics.arrival_time)
            self._num_prompt_tokens += len(group.prompt_token_ids)
        elif seq.index == 0 and metrics.last_token_time is not None:
            self._latencies["inter_token_latency"].append(now - metrics.last_token_time)
        if seq.index == 0:
            metrics.last_token_time = now

    def _process_token(
        self,
        group: _RequestGroup,
        seq: _Sequence,
        token_id: int,
        logprobs: dict[int, Logprob] | None,
        num_output_tokens: int,
        is_last: bool = True,
    ) -> None:
        """Judge one new token of ``seq``, its ``num_output_tokens``-th; ``is_last``: the step's
        last for it (a length limit ends there)."""
        self._num_generation_tokens += 1
        if logprobs is not None and seq.logprobs is not None:
            seq.logprobs.append(logprobs)
            seq.cumulative_logprob += logprobs[token_id].logprob
        request, params = seq.request, group.params
        if seq.grammar is not None:
            seq.grammar.accept(token_id)  # a GrammarError fails the request alone (_complete)
        # The sampler holds EOS and stop tokens back until min_tokens; a row it could only
        # fill with them (every token banned) still must not end the sequence.
        can_stop = num_output_tokens > params.min_tokens
        is_eos = can_stop and token_id in self.eos_token_ids and not params.ignore_eos
        is_stop_token = can_stop and token_id in (params.stop_token_ids or ())
        stop_string = None
        # As in vLLM, the token that stops a sequence is in its token ids, and in its text only
        # with include_stop_str_in_output (a special one never, unless skip_special_tokens is off).
        if seq.detokenizer is not None and (params.include_stop_str_in_output or not (is_eos or is_stop_token)):
            stop_string = seq.detokenizer.add_token(token_id, ends_sequence=is_eos or is_stop_token).stop_string
        if stop_string is not None:
            seq.finish_reason, seq.stop_reason = "stop", stop_string
        elif is_eos:
            # vLLM makes the configured EOS ids besides the tokenizer's stop tokens, which name
            # themselves (Llama 3.1's <|eom_id|>, which ends a tool call, against <|eot_id|>).
            seq.finish_reason = "stop"
            if token_id != self._tokenizer_eos:
                seq.stop_reason = token_id
        elif is_stop_token:
            seq.finish_reason, seq.stop_reason = "stop", token_id
        elif seq.grammar is not None and seq.grammar.is_complete:
            # The text is whole: only EOS could follow (so min_tokens, if unmet, yields to it).
            seq.finish_reason = "stop"
        elif is_last and request.status == RequestStatus.FINISHED_LENGTH:
            seq.finish_reason = "length"
        if seq.finish_reason is None:
            return
        if stop_string is None and seq.detokenizer is not None:
            # The text held for an unfinished character may end in a stop string once released.
            stop_string = seq.detokenizer.finish().stop_string
            if stop_string is not None:
                seq.finish_reason, seq.stop_reason = "stop", stop_string
        if seq.finish_reason == "stop":
            self.scheduler.finish(request.request_id, RequestStatus.FINISHED_STOPPED)

    def _fork_pending(self, group: _RequestGroup) -> None:
        # Forked once sequence 0 has sampled, i.e. its whole prompt is in the KV cache, so
        # the other n - 1 sequences share those blocks instead of computing them again.
        if not group.pending_forks:
            return
        parent = group.sequences[0].request
        for child in group.pending_forks:
            self.scheduler.fork(parent.request_id, child)
        group.pending_forks = []

    def _finish_or_report(self, group: _RequestGroup) -> RequestOutput | None:
        """The group's output (None for a "final_only" request still running); a finished group is dropped."""
        if not group.finished:
            return self._output(group) if group.params.output_kind != "final_only" else None
        group.metrics.finished_time = time.monotonic()
        self._latencies["e2e_request_latency"].append(group.metrics.finished_time - group.metrics.arrival_time)
        output = self._output(group)
        del self._groups[group.request_id]
        self._output_readers.discard(group.request_id)
        for seq in group.sequences:
            self._sequences.pop(seq.request.request_id, None)
        return output

    def _output(self, group: _RequestGroup) -> RequestOutput | None:
        """The group's output; for a "delta" request, None when no sequence gained anything."""
        prompt_logprobs = group.prompt_logprobs
        if group.params.output_kind == "delta":
            is_first = not any(seq.num_reported_tokens or seq.is_end_reported for seq in group.sequences)
            completions = [delta for delta in (seq.delta() for seq in group.sequences) if delta is not None]
            if not completions:
                return None
            prompt_logprobs = prompt_logprobs if is_first else None
        else:
            completions = [seq.completion() for seq in group.sequences]
        return RequestOutput(
            request_id=group.request_id,
            prompt=group.prompt,
            prompt_token_ids=group.prompt_token_ids,
            prompt_logprobs=prompt_logprobs,
            outputs=completions,
            finished=group.finished,
            metrics=replace(group.metrics),  # a snapshot: later steps change the group's
            num_cached_tokens=group.num_cached_tokens(),
        )

    # -- helpers ------------------------------------------------------------------------

    def tokenize_prompt(self, prompt: str | Sequence[int]) -> tuple[str | None, list[int]]:
        """The prompt text (None for token ids) and its token ids, checked against the vocabulary."""
        if isinstance(prompt, str):
            # "" is a prompt where the tokenizer adds BOS, as in vLLM: only no tokens is refused.
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompt token ids instead of text")
            token_ids = self.tokenizer.encode(checked_unicode(prompt, "the prompt"))
            prompt_text, what = prompt, "the prompt's tokens"
        else:
            if isinstance(prompt, (bytes, bytearray)) or not isinstance(prompt, Iterable):
                raise ValueError(f"prompt must be a string or a list of token ids, not {type(prompt).__name__}")
            prompt = list(prompt)  # read once: it may be an iterator
            # NumPy's integers too (a tokenizer's return_tensors="np"), stored as ints.
            bad = [t for t in prompt if not is_integral(t)]
            if bad:
                raise ValueError(f"prompt token ids must be integers, not {bad[:5]}")
            prompt_text, token_ids, what = None, [int(t) for t in prompt], "prompt token ids"
        if not token_ids:
            raise ValueError("prompt is empty")
        # A tokenizer may know more tokens than the model's embedding has rows.
        vocab_size = self.config.model.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"{what} {bad[:5]} are not in the vocabulary [0, {vocab_size})")
        return prompt_text, token_ids

    def _new_sequence(self, request_id: str, index: int, prompt_ids: list[int], params: SamplingParams) -> _Sequence:
        seq_id = request_id if params.n == 1 else f"{request_id}#{index}"
        # Seeded n > 1 completions differ from each other, yet each is reproducible.
        seed = None if params.seed is None else params.seed + index
        if self.tokenizer is None and params.stop:
            raise ValueError(
                f"stop={params.stop!r}: stop strings need a tokenizer, and this model has none; use stop_token_ids"
            )
        detokenizer = (
            IncrementalDetokenizer.for_request(self.tokenizer, prompt_ids, params, self.token_texts)
            if self.tokenizer is not None and params.detokenize
            else None
        )
        return _Sequence(
            index=index,
            # Prompt logprobs are read from the first sequence's prefill only.
            request=Request(
                seq_id, prompt_ids, params, skip_prefix_cache=params.prompt_logprobs is not None and index == 0
            ),
            detokenizer=detokenizer,
            generator=make_generator(seed, self.runner.device),
            logprobs=[] if params.logprobs is not None else None,
        )


def latency_samples() -> dict[str, collections.deque[float]]:
    """Empty samples of each of ``LATENCIES``, each keeping its latest ``MAX_KEPT_LATENCIES``."""
    return {name: collections.deque(maxlen=MAX_KEPT_LATENCIES) for name in LATENCIES}

"""The engine behind a server: ``LLMEngine`` stepping in a thread of its own, asyncio in front.

The engine is not thread-safe, so one thread owns it and every engine call happens there.
Callers on any event loop talk to it through a command queue that the thread drains before
every step; outputs go back to a per-request slot (the latest unread one) through
``loop.call_soon_threadsafe``::

    event loop                               engine thread
    generate() --_Add-----> commands ------> engine.add_request
    (consumer) <--outputs-- request slot <--- engine.step(): a RequestOutput per request
    aclose()   --_Abort---> commands ------> engine.abort (its KV blocks freed)

A bad request is refused alone (``generate`` raises its ``ValueError``); a failed step fails
the requests in flight with ``EngineError`` instead of leaving them waiting forever.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import logging
import queue
import threading
import time
import uuid
import weakref
from collections.abc import AsyncGenerator, Awaitable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

from neuron_llm.beam_search import BeamSearch, BeamSearchOutput, BeamSearchParams
from neuron_llm.engine.llm_engine import LATENCIES, EngineStats, LLMEngine, latency_samples
from neuron_llm.inputs import Prompt, prompt_input
from neuron_llm.outputs import RequestOutput, join_deltas
from neuron_llm.sample.sampler import NoTokenLeftError
from neuron_llm.sample.structured import GrammarError
from neuron_llm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

T = TypeVar("T")

_DRAIN_POLL_S = 0.05
"""How often ``shutdown`` looks whether the requests in flight have ended."""

_CUT_SHORT = "the server shut down before this request finished"

_EXIT_JOIN_S = 30.0
"""How long interpreter exit waits for an engine thread nobody shut down to end its step."""


class QueueFullError(Exception):
    """The waiting queue is full; the request was not accepted (a server answers 429)."""


class EngineClosedError(Exception):
    """The engine is shutting down or stopped: new requests are refused, leftovers aborted (503)."""


class CutShortError(EngineClosedError):
    """Shutdown ended a request it had accepted."""


class RequestAbortedError(Exception):
    """``AsyncLLM.abort`` ended the request."""


class EngineError(Exception):
    """The engine failed while running the request (a server answers 500)."""


class _Stream:
    """Where the engine thread delivers one request's outputs, on its consumer's event loop.

    As vLLM's ``RequestOutputCollector``, what a consumer has not read yet is taken as one
    output: the latest (each holds everything before it), or for a "delta" request the unread
    deltas joined, so that a consumer that reads slowly (a streaming client on a slow link)
    costs no more than its unread tokens. An error is kept beside them and taken after them.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, is_delta: bool) -> None:
        self.loop = loop
        self.is_waiting = True
        """Counted as waiting (``max_waiting_requests``) until its first token; AsyncLLM's lock guards it."""
        self._is_delta = is_delta
        self._ready = asyncio.Event()
        self._outputs: list[RequestOutput] = []
        self._error: Exception | None = None

    def put(self, item: RequestOutput | Exception) -> None:
        """Deliver ``item``; called on the engine thread."""
        try:
            self.loop.call_soon_threadsafe(self._keep, item)
        except RuntimeError:
            # The consumer's loop is closed: nobody is left to read this request.
            pass

    def _keep(self, item: RequestOutput | Exception) -> None:
        if isinstance(item, Exception):
            self._error = self._error or item
        elif self._is_delta:
            self._outputs.append(item)
        else:
            self._outputs = [item]
        self._ready.set()

    async def take(self) -> RequestOutput | Exception:
        """The outputs not yet taken as one, else the error; waits for one."""
        await self._ready.wait()
        if not self._outputs:
            assert self._error is not None
            return self._error
        outputs, self._outputs = self._outputs, []
        if self._error is None:
            self._ready.clear()
        return outputs[0] if len(outputs) == 1 else join_deltas(outputs)


@dataclass(frozen=True)
class _Add:
    stream: _Stream
    prompt: str | list[int]
    params: SamplingParams
    request_id: str
    arrival_time: float = field(default_factory=time.monotonic)
    """When ``generate`` took it: the engine thread adds it only between steps."""


@dataclass(frozen=True)
class _Abort:
    request_id: str
    stream: _Stream | None = None
    """When set, only this stream's request is aborted, not a later one that reused its id."""


@dataclass(frozen=True)
class _Stop:
    pass


_Command = _Add | _Abort | _Stop
"""What other threads ask of the engine thread, which runs them in order before each step."""


class AsyncLLM:
    """Serves an ``LLMEngine`` to asyncio code; the engine steps in a background thread.

    The thread starts here. ``generate`` streams a request's outputs; ``shutdown`` drains and
    stops. Every method may be called from any thread or event loop.

    Args:
        engine: the engine to drive; nothing else may call it until ``shutdown`` returns.
        max_waiting_requests: most accepted requests still waiting for their first token
            (queued, or in prefill); past it ``generate`` raises ``QueueFullError``. A bounded
            backlog keeps the latency of every waiting request bounded too.
    """

    def __init__(self, engine: LLMEngine, max_waiting_requests: int = 256) -> None:
        if max_waiting_requests < 1:
            raise ValueError(f"max_waiting_requests={max_waiting_requests}: must be >= 1")
        self.engine = engine
        self.max_waiting_requests = max_waiting_requests
        self._commands: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        # Guards admission, so that no request is queued behind the stop command or after the
        # thread died, where nothing would ever answer it.
        self._lock = threading.Lock()
        self._is_accepting = True
        self._is_stopped = False
        """The stop command is queued: nothing may be queued after it, where nothing would answer."""
        self._is_dead = False
        self._num_waiting = 0
        self._num_in_flight = 0
        # Engine-thread state. The published stats object is replaced whole, never mutated,
        # so another thread always reads a consistent one.
        self._streams: dict[str, _Stream] = {}
        self._without_token: dict[str, _Stream] = {}
        """Streams whose request may have no token yet: the ones a step looks at."""
        self._is_stopping = False
        self._stats: EngineStats = engine.stats()
        self._latencies = latency_samples()
        self._thread = threading.Thread(target=self._run, name="neuron-llm-engine", daemon=True)
        self._thread.start()
        atexit.register(_stop_at_exit, weakref.ref(self))

    # -- any thread -------------------------------------------------------------------------

    @property
    def is_ready(self) -> bool:
        """Whether new requests are accepted: the loop runs, has not failed and is not shutting
        down, and no tensor-parallel rank has died since its last step."""
        return self._is_accepting and not self._is_dead and self._thread.is_alive() and self.engine.is_alive

    @property
    def num_in_flight(self) -> int:
        """Requests accepted by ``generate``, and beam searches with their steps' requests, that have not ended yet."""
        return self._num_in_flight

    def generate(
        self, prompt: Prompt | Sequence[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncGenerator[RequestOutput, None]:
        """Run one request; yield its output after each step that advanced it, whole or what
        the step added (``SamplingParams.output_kind``), or once at the end ("final_only").

        The last output has ``finished`` set. Outputs that a slow consumer has not read yet
        are merged into one. Before the first output this
        raises ``ValueError`` for a request the engine refuses, and ``QueueFullError`` or
        ``EngineClosedError`` when it cannot be accepted; afterwards ``EngineError`` if the
        engine fails, ``GrammarError`` (a ``ValueError``) if the request's structured output
        gives out partway, ``NoTokenLeftError`` (a ``ValueError``) if its bad words ban every
        token its other constraints leave, ``EngineClosedError`` if shutdown aborts the request, or
        ``RequestAbortedError`` if ``abort`` does. A consumer that
        stops early (``aclose``, cancellation) aborts the request, which frees its KV blocks.
        """
        return self._outputs(prompt, params, request_id, is_step=False)

    async def _outputs(
        self, prompt: Prompt | Sequence[int], params: SamplingParams, request_id: str | None, is_step: bool
    ) -> AsyncGenerator[RequestOutput, None]:
        request_id = uuid.uuid4().hex if request_id is None else request_id
        stream = _Stream(asyncio.get_running_loop(), is_delta=params.output_kind == "delta")
        prompt = prompt_input(prompt) if isinstance(prompt, (str, dict)) else list(prompt)
        self._admit(_Add(stream, prompt, params, request_id), is_step)
        is_ended = False
        try:
            while not is_ended:
                item = await stream.take()
                if isinstance(item, Exception):
                    is_ended = True  # the engine holds the request no more
                    raise item
                self._stop_waiting(stream)
                is_ended = item.finished
                yield item
        finally:
            if not is_ended:
                self._commands.put(_Abort(request_id, stream))
            self._stop_waiting(stream)
            with self._lock:
                self._num_in_flight -= 1

    async def beam_search(
        self, prompt_token_ids: Sequence[int], params: BeamSearchParams, request_id: str | None = None
    ) -> BeamSearchOutput:
        """The ``params.beam_width`` best continuations of one prompt (``neuron_llm.beam_search``),
        as vLLM's ``EngineClient.beam_search``. Each step runs every live beam as a request of
        one token (``{request_id}-{step}-{beam}``), among whatever else the engine runs. Texts
        are left None.

        Raises ``ValueError`` for a prompt that leaves no room for output, else as ``generate``
        does; a failed or cancelled step aborts the step's other requests. ``abort`` knows only
        the steps' ids: cancel the search's task to end it.
        """
        request_id = uuid.uuid4().hex if request_id is None else request_id
        self.engine.scheduler.check_prompt_of_one_token(len(prompt_token_ids))
        max_prompt_len, _ = self.engine.scheduler.longest_prompt_of_one_token()
        search = BeamSearch([list(prompt_token_ids)], params, self.engine.eos_token_ids, max_prompt_len)
        # Admitted as one request: waiting until its first step ends, in flight (drained) until the last.
        with self._lock:
            self._check_admissible()
            self._num_waiting += 1
            self._num_in_flight += 1
        is_waiting, step = True, 0
        try:
            while beams := search.beams():
                requests = (
                    self._step_output(beam.tokens, search.step_params, f"{request_id}-{step}-{i}")
                    for i, beam in enumerate(beams)
                )
                search.extend(await gather_or_cancel(*requests))
                if is_waiting:
                    with self._lock:
                        self._num_waiting -= 1
                    is_waiting = False
                step += 1
        finally:
            with self._lock:
                if is_waiting:
                    self._num_waiting -= 1
                self._num_in_flight -= 1
        (output,) = search.results()
        return output

    async def _step_output(self, prompt: Sequence[int], params: SamplingParams, request_id: str) -> RequestOutput:
        """The one output of a beam search's step request."""
        async for output in self._outputs(prompt, params, request_id, is_step=True):
            pass
        return output

    def abort(self, request_id: str | Iterable[str]) -> None:
        """Abort a request, or several (as vLLM's takes them), and free their blocks (their
        ``generate`` raises ``RequestAbortedError``); unknown or finished ids are ignored."""
        request_ids = [request_id] if isinstance(request_id, str) else list(request_id)
        bad = [value for value in request_ids if not isinstance(value, str)]
        if bad:
            # Checked here: on the engine's thread it would fail every request in flight.
            raise TypeError(f"request ids are strings, not {bad[0]!r:.80}")
        for value in request_ids:
            self._commands.put(_Abort(value))

    def stats(self) -> EngineStats:
        """The engine's gauges and counters after its latest step, with latencies since the last call."""
        return replace(self._stats, **{name: _drain(samples) for name, samples in self._latencies.items()})

    async def shutdown(self, drain_timeout: float = 30.0) -> None:
        """Stop accepting requests, wait up to ``drain_timeout`` s for those in flight, abort the rest.

        Aborted requests raise ``EngineClosedError`` in their consumers. Returns once the
        engine thread has stopped; the engine is the caller's again.
        """
        with self._lock:
            self._is_accepting = False
        deadline = time.monotonic() + drain_timeout
        while self._num_in_flight and time.monotonic() < deadline and self._thread.is_alive():
            await asyncio.sleep(_DRAIN_POLL_S)
        if self._num_in_flight:
            logger.warning("aborting %d request(s) still in flight after %.1f s", self._num_in_flight, drain_timeout)
        with self._lock:
            self._queue_stop()
        await asyncio.to_thread(self._thread.join)

    def _admit(self, add: _Add, is_step: bool) -> None:
        """Queue ``add``; a beam search's step (``is_step``), admitted with its search, is held
        back by neither a drain nor the waiting limit, and does not count as waiting."""
        with self._lock:
            self._check_alive()
            if is_step:
                if self._is_stopped:
                    raise CutShortError(_CUT_SHORT)
                add.stream.is_waiting = False
            else:
                self._check_admissible()
                self._num_waiting += 1
            self._num_in_flight += 1
            self._commands.put(add)

    def _check_alive(self) -> None:
        """Raise if the engine thread died after an error; the caller holds the lock."""
        if self._is_dead:
            raise EngineError("the engine stopped after an error; restart the server")

    def _check_admissible(self) -> None:
        """Raise unless a new request may be accepted now; the caller holds the lock."""
        self._check_alive()
        if not self._is_accepting:
            raise EngineClosedError("the engine is shutting down and accepts no new requests")
        if self._num_waiting >= self.max_waiting_requests:
            raise QueueFullError(f"the waiting queue is full ({self.max_waiting_requests} requests); retry later")

    def _queue_stop(self) -> None:
        """Queue the stop command, after which nothing is admitted; the caller holds the lock."""
        self._is_stopped = True
        if not self._is_dead:
            self._commands.put(_Stop())

    def _stop_waiting(self, stream: _Stream) -> None:
        """Count ``stream``'s request as waiting no more: its first token came, or it ended."""
        with self._lock:
            if stream.is_waiting:
                stream.is_waiting = False
                self._num_waiting -= 1

    # -- the engine thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._is_stopping:
                self._run_commands(block=not self.engine.has_unfinished_requests())
                if self.engine.has_unfinished_requests() and not self._is_stopping:
                    self._step()
                else:
                    self._publish_stats()  # adds and aborts change the gauges too
        except Exception:  # a bug in the loop itself: fail every request rather than hang it
            logger.exception("the engine loop failed")
            self._die(EngineError("the engine loop failed; see the server log"))

    def _run_commands(self, block: bool) -> None:
        command = self._commands.get() if block else _get_nowait(self._commands)
        while command is not None:
            if isinstance(command, _Add):
                self._add(command)
            elif isinstance(command, _Abort):
                self._abort(command)
            else:
                self._stop()
            command = _get_nowait(self._commands)

    def _add(self, add: _Add) -> None:
        try:
            self.engine.add_request(add.prompt, add.params, add.request_id, arrival_time=add.arrival_time)
        except ValueError as e:
            add.stream.put(e)
            return
        except Exception as e:  # not the request's fault: report it and keep serving the others
            logger.exception("add_request failed for request %s", add.request_id)
            add.stream.put(EngineError(f"the engine could not add the request: {e}"))
            return
        self._streams[add.request_id] = add.stream
        self._without_token[add.request_id] = add.stream

    def _abort(self, abort: _Abort) -> None:
        stream = self._streams.get(abort.request_id)
        if stream is not None and abort.stream in (None, stream):
            del self._streams[abort.request_id]
            self._without_token.pop(abort.request_id, None)
            self.engine.abort(abort.request_id)
            if abort.stream is None:
                # Aborted by id (``abort``), not by its consumer leaving: the consumer still waits.
                stream.put(RequestAbortedError(f"request {abort.request_id!r} was aborted"))

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:
            logger.exception("engine step failed")
            if not self.engine.is_alive:
                # A tensor-parallel rank failed: no step can run again, so stop reporting ready.
                self._die(EngineError(f"the engine can run no more steps ({e}); restart the server"))
                self._is_stopping = True
                return
            # Which requests the failure touched is unknown: end them all, keep the engine.
            self._end_all(EngineError(f"the engine failed while running this request: {e}"))
            self._publish_stats()
            return
        # Published first, so that a consumer holding an output sees stats that include it.
        self._publish_stats()
        # A request asking for its final output only is running once it has a token, though
        # its consumer hears nothing until it ends.
        for request_id, stream in list(self._without_token.items()):
            if self._streams.get(request_id) is not stream or self.engine.has_first_token(request_id):
                self._stop_waiting(stream)
                del self._without_token[request_id]
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            if output.finished:
                del self._streams[output.request_id]
            stream.put(output)
        for request_id, error in self.engine.take_failures():
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                # A grammar llguidance gave up on, or constraints that left no token, are the
                # request's own fault, as a bad one is.
                if not isinstance(error, (GrammarError, NoTokenLeftError)):
                    error = EngineError(f"the engine failed while running this request: {error}")
                stream.put(error)

    def _end_all(self, error: Exception) -> None:
        """End every request the engine holds with ``error``, aborting it there."""
        streams, self._streams = self._streams, {}
        self._without_token.clear()
        # Every consumer hears first: an abort that raises (the engine's state unknown after
        # a failed step) must leave none of them waiting.
        for stream in streams.values():
            stream.put(error)
        for request_id in streams:
            self.engine.abort(request_id)

    def _stop(self) -> None:
        self._is_stopping = True
        self._end_all(CutShortError(_CUT_SHORT))

    def _die(self, error: EngineError) -> None:
        with self._lock:
            self._is_dead = True
        for stream in self._streams.values():
            stream.put(error)
        self._streams = {}
        # Requests admitted before the flag was set are still queued: answer them too.
        command = _get_nowait(self._commands)
        while command is not None:
            if isinstance(command, _Add):
                command.stream.put(error)
            command = _get_nowait(self._commands)

    def _publish_stats(self) -> None:
        stats = self.engine.stats()
        for name, samples in self._latencies.items():
            samples.extend(getattr(stats, name))
        self._stats = replace(stats, **{name: [] for name in LATENCIES})


async def gather_or_cancel(*awaitables: Awaitable[T]) -> list[T]:
    """``asyncio.gather``, but an error or a cancellation first cancels the awaitables still
    running: each of them that is a request aborts it rather than running on unread."""
    tasks = [asyncio.ensure_future(awaitable) for awaitable in awaitables]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _get_nowait(commands: queue.SimpleQueue[_Command]) -> _Command | None:
    try:
        return commands.get_nowait()
    except queue.Empty:
        return None


def _drain(samples: collections.deque[float]) -> list[float]:
    # popleft is atomic, so samples the engine thread appends meanwhile stay for the next call.
    drained = []
    while samples:
        drained.append(samples.popleft())
    return drained


def _stop_at_exit(ref: weakref.ref[AsyncLLM]) -> None:
    """Stop the engine thread of an ``AsyncLLM`` nobody shut down (a script that failed or
    returned with requests in flight): a daemon thread still inside a torch step when the
    interpreter finalizes aborts the process ("terminate called", status 134)."""
    engine = ref()
    if engine is None or not engine._thread.is_alive():
        return
    with engine._lock:
        engine._is_accepting = False
        engine._queue_stop()
    engine._thread.join(_EXIT_JOIN_S)


__all__ = ["AsyncLLM", "CutShortError", "EngineClosedError", "EngineError", "QueueFullError"]

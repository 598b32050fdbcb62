"""One HTTP request's prompts running in the engine, and the client that may leave meanwhile.

A request's prompts (a completion batch) run as separate engine requests whose outputs are
merged into one stream of ``(prompt index, output)``. Errors that belong to the request
(a refused prompt, a full queue) arrive before its first output, so ``Generation.start``
raises them before any response byte is sent: they become a 4xx or 503 rather than a broken
stream. Leaving the stream early, for any reason, aborts every engine request of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace
from typing import TypeVar

from fastapi import Request
from starlette.requests import ClientDisconnect
from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from neuron_llm.engine.async_llm import AsyncLLM, CutShortError, EngineClosedError
from neuron_llm.outputs import RequestOutput, join_deltas
from neuron_llm.sampling_params import SamplingParams
from neuron_llm.serve.errors import ClientDisconnected, ServerError, error_from_engine
from neuron_llm.serve.metrics import ServerMetrics
from neuron_llm.serve.prompts import Prompt
from neuron_llm.serve.streaming import DONE_EVENT, error_event

logger = logging.getLogger(__name__)

T = TypeVar("T")
IndexedOutput = tuple[int, RequestOutput]


class Generation:
    """The engine requests of one HTTP request, whose ``outputs`` are ``(prompt index, output)``
    pairs: ``sampled``'s, or whole beam searches' (``neuron_llm.serve.beam_search``).

    Call ``start`` first. ``final_outputs`` joins each prompt's outputs; the last one of each
    prompt has ``finished``. Engine errors are raised as ``ServeError``, naming ``prompt_param``
    (the request field holding the prompts) if the engine refuses a prompt, and
    ``structure_param`` (the field that asked for a structured output) if its grammar gives
    out partway. The outcome (success, or aborted when the iteration stops early) is counted
    in ``metrics``.
    """

    def __init__(
        self,
        outputs: AsyncGenerator[IndexedOutput, None],
        metrics: ServerMetrics,
        prompt_param: str = "prompt",
        structure_param: str | None = None,
    ) -> None:
        self._outputs = outputs
        self._first: IndexedOutput | None = None
        self._metrics = metrics
        self._prompt_param = prompt_param
        self._structure_param = structure_param
        self._is_counted = False

    def _count(self, outcome: str | None) -> None:
        """Count the request's outcome once; None when an error handler counts it."""
        if not self._is_counted and outcome is not None:
            self._metrics.count_request(outcome)
        self._is_counted = True

    async def start(self) -> None:
        """Wait for the first output; raises the request's own errors as ``ServeError``."""
        try:
            self._first = await anext(self._outputs)
        except Exception as e:
            await self._outputs.aclose()
            # Accepted, then cut short by a shutdown (a beam search yields only at its end).
            self._count("aborted" if isinstance(e, CutShortError) else None)
            raise error_from_engine(e, self._prompt_param, self._structure_param) from e
        except BaseException:  # cancelled: the client left, or the server is stopping
            await self.aclose()
            raise

    @property
    def first_output(self) -> IndexedOutput:
        """The output ``start`` waited for."""
        assert self._first is not None, "call start() first"
        return self._first

    async def outputs(self) -> AsyncGenerator[IndexedOutput, None]:
        """The outputs, the first included; close the iterator (``aclosing``) when leaving early."""
        assert self._first is not None, "call start() first"
        outcome: str | None = "aborted"
        try:
            yield self._first
            async for item in self._outputs:
                yield item
            outcome = "success"
        except Exception as e:
            # Cut short by a shutdown past its drain timeout: answered 503, but accepted and
            # served in part, so aborted rather than rejected. Others are counted where answered.
            outcome = "aborted" if isinstance(e, EngineClosedError) else None
            raise error_from_engine(e, self._prompt_param, self._structure_param) from e
        finally:
            await self._outputs.aclose()
            self._count(outcome)

    def count_error(self) -> None:
        """Count the request as failed by a bug, whatever outcome was counted before."""
        self._metrics.count_request("error", overrides=True)
        self._is_counted = True

    async def aclose(self) -> None:
        """Abort what is still running (counted as aborted); a no-op once the outputs have ended.

        Closing ``outputs()`` does this, but only once it has been iterated: a response that
        never starts sending must call this, or the engine requests run on unread.
        """
        await self._outputs.aclose()
        self._count("aborted")

    async def final_outputs(self, num_prompts: int) -> list[RequestOutput]:
        """Run to the end; each prompt's whole output, in prompt order."""
        deltas: dict[int, list[RequestOutput]] = {index: [] for index in range(num_prompts)}
        async with contextlib.aclosing(self.outputs()) as outputs:
            async for index, output in outputs:
                deltas[index].append(output)
        return [join_deltas(deltas[index]) for index in range(num_prompts)]


def sampled(
    engine: AsyncLLM,
    prompts: Sequence[Prompt],
    params: SamplingParams | Sequence[SamplingParams],
    request_id: str,
) -> AsyncGenerator[IndexedOutput, None]:
    """The outputs of each prompt sampled with its ``params`` (every prompt's, or one per prompt).

    Each output holds what one engine step added (``output_kind="delta"``: the first one marks
    the request as no longer waiting, which a final-only output would do only at its end).
    """
    per_prompt = [params] * len(prompts) if isinstance(params, SamplingParams) else params
    streams = [
        engine.generate(p.token_ids, replace(prompt_params, output_kind="delta"), f"{request_id}-{i}")
        for i, (p, prompt_params) in enumerate(zip(prompts, per_prompt, strict=True))
    ]
    return _merge(streams)


async def _merge(streams: list[AsyncGenerator[RequestOutput, None]]) -> AsyncGenerator[IndexedOutput, None]:
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as stream:
            async for output in stream:
                yield 0, output
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | asyncio.Task[None]]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[RequestOutput]) -> None:
        async for output in stream:
            queue.put_nowait((index, output))

    def on_done(index: int) -> Callable[[asyncio.Task[None]], None]:
        # A pump that is done marks its stream's end; its result() raises the stream's error.
        return lambda task: queue.put_nowait((index, task))

    tasks = []
    for index, stream in enumerate(streams):
        task = asyncio.create_task(pump(index, stream))
        task.add_done_callback(on_done(index))
        tasks.append(task)
    try:
        num_running = len(tasks)
        while num_running:
            index, item = await queue.get()
            if isinstance(item, asyncio.Task):
                item.result()
                num_running -= 1
            else:
                yield index, item
    finally:
        # Cancelling a pump cancels its stream, which aborts that engine request.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it if the client disconnects first (``ClientDisconnected``).

    A plain (non-streaming) handler is otherwise left running after its client has gone,
    holding KV blocks for an answer nobody reads.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():  # the client left, or this handler is being cancelled
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read, so the next message the server sends is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


class EventStreamResponse(StreamingResponse):
    """Server-sent events of ``generation``, from an async iterator of ``data:`` payloads.

    Starlette stops iterating when the client disconnects, and never starts when the client
    is gone before the first byte; closing the iterator and the generation here aborts the
    engine requests at once rather than whenever they are collected. A client that left is
    the end of the stream, not an error: under ASGI 2.4 servers, whose ``send`` raises
    OSError once the client is gone, Starlette raises ``ClientDisconnect``, taken here.
    """

    def __init__(self, events: AsyncGenerator[str, None], generation: Generation) -> None:
        super().__init__(
            self._ending_on_error(events), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
        self._events = events
        self._generation = generation

    async def _ending_on_error(self, events: AsyncGenerator[str, None]) -> AsyncGenerator[str, None]:
        try:
            async for event in events:
                yield event
        except Exception:
            # A bug while streaming: the client gets an error event and the stream's end, not
            # a connection cut mid-chunk.
            logger.exception("unhandled error streaming a response")
            self._generation.count_error()
            yield error_event(ServerError("internal server error; see the server log"))
            yield DONE_EVENT

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        client_left = False

        async def send_to_client(message: Message) -> None:
            nonlocal client_left
            try:
                await send(message)
            except OSError:
                client_left = True
                raise

        try:
            await super().__call__(scope, receive, send_to_client)
        except (ClientDisconnect, OSError):
            if not client_left:  # an OSError of the server's own, not the client's leaving
                raise
        finally:
            await self._events.aclose()
            await self._generation.aclose()

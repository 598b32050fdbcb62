"""A bound on request bodies: a 413 rather than a server that reads, parses and tokenizes
whatever a client sends (a 50 MB prompt takes minutes to tokenize before the context length
refuses it)."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from neuron_llm.serve.errors import REQUEST_TOO_LARGE, ClientError
from neuron_llm.serve.metrics import ServerMetrics


class LimitBody:
    """Answers 413 to a request whose body is over ``max_bytes``: from its ``Content-Length``
    before reading any of it, or, for a body sent in chunks, once the limit has been read."""

    def __init__(self, app: ASGIApp, max_bytes: int, metrics: ServerMetrics) -> None:
        self._app = app
        self._max_bytes = max_bytes
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length", "")
        if length.isascii() and length.isdigit() and int(length) > self._max_bytes:
            error = self._error()
            self._metrics.count_refusal(error.status_code)
            await error.response()(scope, receive, send)
            return
        received = 0

        async def receive_within_limit() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self._max_bytes:
                    # FastAPI passes an HTTPException from reading the body on to its handler.
                    raise HTTPException(413, self._error().message)
            return message

        await self._app(scope, receive_within_limit, send)

    def _error(self) -> ClientError:
        return ClientError(
            f"the request body is over {self._max_bytes} bytes (the server's --max-request-bytes)",
            code=REQUEST_TOO_LARGE,
            status_code=413,
        )

"""The API key check, made before a request's body is read.

A route dependency would run only after FastAPI has read and parsed the body, so a caller
without the key would learn from a 400 or 422 how the server parses what it sends, and
could make it read megabytes first. This middleware answers 401 from the headers alone.
"""

from __future__ import annotations

import secrets

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from neuron_llm.serve.errors import AuthenticationError
from neuron_llm.serve.metrics import ServerMetrics

OPEN_PATHS = frozenset(
    {"/ping", "/health", "/metrics", "/version", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
)
"""Paths served without the key: health checks, monitoring and the API's own description."""


class RequireApiKey:
    """Answers 401 to a request for any path but ``OPEN_PATHS`` without ``Authorization: Bearer <key>``."""

    def __init__(self, app: ASGIApp, api_key: str, metrics: ServerMetrics) -> None:
        self._app = app
        self._key = api_key.encode()
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or self._authorized(Headers(scope=scope)):
            await self._app(scope, receive, send)
            return
        error = AuthenticationError("a valid API key is required: send `Authorization: Bearer <key>`")
        self._metrics.count_refusal(error.status_code)
        await error.response()(scope, receive, send)

    def _authorized(self, headers: Headers) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), self._key)

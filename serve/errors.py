"""The errors the server answers with, all in OpenAI's shape.

Routes raise ``ClientError`` (a 4xx naming the bad parameter) or ``ServerError`` (a 5xx);
the handlers installed by ``install_error_handlers`` turn those, request validation errors
and the engine's admission errors into ``{"error": {"message", "type", "param", "code"}}``.
Anything else is a bug: ``CountRequests`` logs it and answers with a 500 in the same shape.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from neuron_llm.engine.async_llm import EngineClosedError, EngineError, QueueFullError
from neuron_llm.sample.structured import GrammarError
from neuron_llm.serve.metrics import ServerMetrics
from neuron_llm.serve.protocol import INVOCATION_KINDS

logger = logging.getLogger(__name__)


RETRY_AFTER_S = 1
"""Retry-After of a full queue (429) and of a loading model (503)."""


class ClientDisconnected(Exception):
    """The client closed the connection before its response was ready; nobody is left to answer."""


class ServeError(Exception):
    """An error answered in OpenAI's shape."""

    status_code = 500
    error_type = "server_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        """The JSON body of the answer."""
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}

    def body_json(self) -> str:
        """``body()`` as JSON text."""
        return json.dumps(self.body())

    def headers(self) -> dict[str, str]:
        """The answer's HTTP headers beyond the body's."""
        return {}

    def response(self) -> JSONResponse:
        """The whole answer: status, headers and body."""
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers())


REQUEST_TOO_LARGE = "request_too_large"
"""The code of a 413: a body over ``--max-request-bytes`` (``LimitBody``)."""


class ClientError(ServeError):
    """The request is wrong; ``param`` names the offending field when there is one."""

    status_code = 400
    error_type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status_code: int = 400) -> None:
        super().__init__(message, param, code)
        self.status_code = status_code


class AuthenticationError(ClientError):
    """The API key is missing or wrong."""

    error_type = "authentication_error"

    def __init__(self, message: str) -> None:
        super().__init__(message, code="invalid_api_key", status_code=401)

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}  # the scheme a 401 must name (RFC 9110)


class ModelNotFoundError(ClientError):
    """The request names a model this server does not serve."""

    def __init__(self, model: str, served: str) -> None:
        message = f"the model {model!r} does not exist; this server serves {served!r}"
        super().__init__(message, "model", "model_not_found", status_code=404)


class OverloadedError(ServeError):
    """The waiting queue is full; the client should retry later."""

    status_code = 429
    error_type = "rate_limit_error"

    def headers(self) -> dict[str, str]:
        # OpenAI's clients wait as long as Retry-After says before retrying, else back off on their own.
        return {"Retry-After": str(RETRY_AFTER_S)}


class UnavailableError(ServeError):
    """The model is still loading, or the server is draining before it stops."""

    status_code = 503
    error_type = "service_unavailable"

    def headers(self) -> dict[str, str]:
        # A loading model is ready soon; a draining or failed server names no time to wait for.
        return {"Retry-After": str(RETRY_AFTER_S)} if self.code == "model_loading" else {}


class ServerError(ServeError):
    """The server failed to serve a valid request."""


def error_from_value_error(error: ValueError, param: str | None = None) -> ClientError:
    """A ``ClientError`` for a ``ValueError`` our library raised as ``"field=value: why"``.

    ``param`` is used when the message names no field; the field found is used otherwise.
    """
    message = str(error)
    head = message.split("=", 1)[0]
    if "=" in message and head.isidentifier():
        param = head
    return ClientError(message, param)


def error_from_engine(error: Exception, prompt_param: str = "prompt", structure_param: str | None = None) -> ServeError:
    """The answer to an exception raised by ``AsyncLLM.generate``.

    The engine refuses a request (``ValueError``) for its prompt's length, which is checked
    before it gets there, so ``prompt_param`` is named unless the message names a field (as
    ``NoTokenLeftError``'s names ``bad_words``).
    A structured output that gave out partway (``GrammarError``) names ``structure_param``, the
    request field that asked for it.
    """
    if isinstance(error, GrammarError):
        if structure_param is None:
            return ClientError(str(error))
        return ClientError(f"{structure_param}: {error.reason}", structure_param)
    if isinstance(error, ValueError):
        return error_from_value_error(error, prompt_param)
    if isinstance(error, QueueFullError):
        return OverloadedError(str(error), code="queue_full")
    if isinstance(error, EngineClosedError):
        return UnavailableError(str(error), code="shutting_down")
    if isinstance(error, EngineError):
        return ServerError(str(error), code="engine_error")
    raise error


def error_from_validation(errors: Sequence[Any]) -> ClientError:
    """A ``ClientError`` naming the field that failed validation.

    When a value matched none of a union's types pydantic reports one error per type; the
    field named is then the deepest one all the errors share. Otherwise it is the first
    error's field, and the message lists the first few errors.
    """
    if not errors:
        return ClientError("invalid request body")
    first = errors[0]
    if first.get("type") == "json_invalid":
        reason = first.get("ctx", {}).get("error", "not valid JSON")
        return ClientError(f"the request body is not valid JSON: {reason}", code="invalid_json")
    paths = [_field_path(error.get("loc", ())) for error in errors]
    unknown = [_format_path(path) for path, error in zip(paths, errors) if error.get("type") == "extra_forbidden"]
    if unknown:
        # Each is a field of its own, whatever the others share: name them all.
        return ClientError(f"unknown field(s) {', '.join(unknown[:5])}: not part of this API", unknown[0])
    common = _common_prefix(paths)
    if common:
        param = _format_path(common)
        reasons = list(dict.fromkeys(_reason(error) for error in errors))[:3]
        return ClientError(f"{param}: {'; or '.join(reasons)}", param)
    problems = [f"{_format_path(path) or 'body'}: {_reason(error)}" for path, error in zip(paths, errors)]
    return ClientError("; ".join(problems[:3]), _format_path(paths[0]) or None)


def _reason(error: Any) -> str:
    # A validator's own message, without the "Value error, " pydantic puts before it.
    if error.get("type") == "value_error" and "error" in error.get("ctx", {}):
        return str(error["ctx"]["error"])
    return str(error.get("msg", "invalid"))


def _field_path(loc: Sequence[Any]) -> list[Any]:
    path = list(loc[1:]) if loc and loc[0] == "body" else list(loc)
    # The /invocations body is a tagged union; pydantic puts the tag, which names no field, first.
    if path and path[0] in INVOCATION_KINDS:
        path = path[1:]
    # So does a plain union its member type ("list[TextContent]"), which no field is called.
    return [part for part in path if not (isinstance(part, str) and "[" in part)]


def _common_prefix(paths: list[list[Any]]) -> list[Any]:
    prefix = paths[0]
    for path in paths[1:]:
        length = 0
        while length < min(len(prefix), len(path)) and prefix[length] == path[length]:
            length += 1
        prefix = prefix[:length]
    return prefix


def _format_path(path: Sequence[Any]) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def install_error_handlers(app: FastAPI, metrics: ServerMetrics) -> None:
    """Answer every error in OpenAI's shape, and count each request once by outcome (``CountRequests``)."""

    def answer(error: ServeError, counted: bool = True) -> JSONResponse:
        if counted:
            metrics.count_refusal(error.status_code)
        return error.response()

    @app.exception_handler(ServeError)
    async def on_serve_error(request: Request, error: ServeError) -> JSONResponse:
        return answer(error)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        # A body FastAPI did not parse as JSON (its Content-Type is not JSON) reaches validation
        # as bytes; "Input should be a valid dictionary" would not tell the client why.
        if isinstance(error.body, bytes):
            content_type = request.headers.get("content-type")
            message = f"the request body must be JSON, sent with Content-Type: application/json, not {content_type!r}"
            return answer(ClientError(message, code="unsupported_media_type", status_code=415))
        return answer(error_from_validation(error.errors()))

    @app.exception_handler(ClientDisconnected)
    async def on_disconnect(request: Request, error: ClientDisconnected) -> Response:
        # Counted as aborted where the generation was cancelled; 499 as nginx logs it.
        return Response(status_code=499)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, error: StarletteHTTPException) -> Response:
        # Routing errors, an unknown path (404) or method (405), are not counted: scanners and
        # probes are not requests of the API. A body that could not be read is, unless the
        # client left while it was being read (FastAPI answers that too as a 400).
        if isinstance(error.__cause__, ClientDisconnect):
            return Response(status_code=499)
        message, code = str(error.detail), None
        if isinstance(error.__cause__, UnicodeDecodeError):  # FastAPI says only "error parsing the body"
            message, code = f"the request body is not UTF-8 JSON: {error.__cause__}", "invalid_json"
        elif error.status_code == 413:
            code = REQUEST_TOO_LARGE
        client_error = ClientError(message, code=code, status_code=error.status_code)
        response = answer(client_error, counted=error.status_code not in (404, 405))
        if error.status_code == 405:
            # Starlette's Allow names the first route of the path only; a path may have several.
            response.headers["Allow"] = ", ".join(_methods_of_path(request))
        return response

    app.add_middleware(CountRequests, metrics=metrics)


def _methods_of_path(request: Request) -> list[str]:
    """The methods some route of the request's path takes (asked of the routes themselves:
    routers included in the app match as one route)."""
    return [
        method
        for method in ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")
        if any(route.matches({**request.scope, "method": method})[0] is Match.FULL for route in request.app.routes)
    ]


class CountRequests:
    """Counts each POST request once, by outcome, and answers an error no handler took.

    Starlette's own handler for ``Exception`` runs in its outermost middleware, which raises
    the error again after answering: the server then closes the connection, failing the
    client's next request on it. Here a bug is logged, counted as an error (over any outcome
    counted before it) and answered with a 500 in OpenAI's shape; the connection lives on.
    """

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self._app = app
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = False

        async def send_noting_start(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        # Requests of the API are its POST routes; a GET (/v1/models, /ping, /health) is a poll
        # of the server's state, and one refused while it loads is not a refused request. A
        # bug is counted on any route.
        with self._metrics.counting_request(counted=scope["method"] == "POST"):
            try:
                await self._app(scope, receive, send_noting_start)
            except Exception:
                logger.exception("unhandled error serving %s %s", scope["method"], scope["path"])
                self._metrics.count_request("error", overrides=True)
                if started:
                    raise  # the answer is under way: only ending the connection can cut it short
                error = ServerError("internal server error; see the server log")
                await error.response()(scope, receive, send)

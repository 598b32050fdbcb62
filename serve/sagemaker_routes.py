"""SageMaker's container contract: ``GET /ping`` and ``POST /invocations`` (port 8080).

SageMaker routes traffic to the container once ``/ping`` answers 200, so it answers 503
until the model has loaded. ``/invocations`` takes an OpenAI completion or chat body, or the
TGI-style ``{"inputs", "parameters"}`` body, and answers in the shape it was asked in; an
OpenAI body's ``model`` is not checked there.
SageMaker authenticates callers with IAM before they reach the container, so a SageMaker
deployment sets no API key; a server started with one requires it here as on ``/v1``, since
``/invocations`` generates as ``/v1`` does.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute

from neuron_llm.serve.chat import serve_chat
from neuron_llm.serve.completions import serve_completion
from neuron_llm.serve.openai_routes import ERROR_RESPONSES
from neuron_llm.serve.protocol import ChatCompletionRequest, CompletionRequest, InvocationRequest, TGIRequest
from neuron_llm.serve.state import get_state
from neuron_llm.serve.tgi import serve_tgi


class _OctetStreamIsJSON(APIRoute):
    """Reads an ``application/octet-stream`` body as JSON: a SageMaker Python SDK ``Predictor``
    sends its body so unless it is given a JSON serializer. So too a body of no content type
    (InvokeEndpoint's ``ContentType`` is optional)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            content_type = request.headers.get("content-type", "")
            if content_type.split(";", 1)[0].strip().lower() in ("", "application/octet-stream"):
                headers = [(k, v) for k, v in request.scope["headers"] if k != b"content-type"]
                scope = {**request.scope, "headers": [*headers, (b"content-type", b"application/json")]}
                request = Request(scope, request.receive)
            return await handler(request)

        return handle


router = APIRouter(route_class=_OctetStreamIsJSON)


@router.get("/ping", responses={503: {"description": "the model is loading, or the server is draining"}})
# SageMaker GETs it; load balancers probe with HEAD, and vLLM takes POST too.
@router.api_route("/ping", methods=["HEAD", "POST"], include_in_schema=False)
async def ping(request: Request) -> JSONResponse:
    """200 once the model is loaded and the server accepts requests; 503 before and while draining."""
    status = get_state(request).status
    return JSONResponse({"status": status}, status_code=200 if status == "ready" else 503)


@router.post("/invocations", responses=ERROR_RESPONSES)
async def invocations(body: InvocationRequest, request: Request) -> Response:
    """Generate for an OpenAI completion or chat body, or a TGI-style body."""
    state = get_state(request)
    if isinstance(body, TGIRequest):
        return await serve_tgi(state, body, request)
    # An endpoint serves one model, whatever name a body carries: clients written for other
    # containers send theirs (TGI's Messages API examples send "tgi").
    body = body.model_copy(update={"model": None})
    if isinstance(body, ChatCompletionRequest):
        return await serve_chat(state, body, request)
    assert isinstance(body, CompletionRequest)
    return await serve_completion(state, body, request)

"""OpenAI-compatible routes: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models[/{model}]``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from neuron_llm.serve.chat import serve_chat
from neuron_llm.serve.completions import serve_completion
from neuron_llm.serve.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from neuron_llm.serve.state import ServedModel, get_state

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 429, 500, 503)
}
_STREAM_RESPONSE: dict[str, Any] = {"text/event-stream": {"schema": {"type": "string"}}}

router = APIRouter(prefix="/v1", responses=ERROR_RESPONSES)


@router.get("/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    """The one model this server serves."""
    return ModelList(data=[_card(get_state(request).ready_model())])


@router.get("/models/{model:path}", response_model=ModelCard)
async def retrieve_model(model: str, request: Request) -> ModelCard:
    """The served model's card, if ``model`` names it (OpenAI's ``models.retrieve``)."""
    served = get_state(request).ready_model()
    served.check_name(model)
    return _card(served)


def _card(model: ServedModel) -> ModelCard:
    return ModelCard(id=model.name, created=model.created, max_model_len=model.max_model_len)


@router.post(
    "/completions",
    response_model=CompletionResponse,
    responses={200: {"content": _STREAM_RESPONSE, "description": "JSON, or server-sent events with `stream`"}},
)
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    """Complete one prompt or a batch of them."""
    return await serve_completion(get_state(request), body, request)


@router.post(
    "/chat/completions",
    response_model=ChatCompletionResponse,
    responses={200: {"content": _STREAM_RESPONSE, "description": "JSON, or server-sent events with `stream`"}},
)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    """Reply to a conversation."""
    return await serve_chat(get_state(request), body, request)

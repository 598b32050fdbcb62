"""vLLM's ``POST /tokenize`` and ``POST /detokenize``: a prompt's tokens as the model reads them, and back.

``/tokenize`` takes a completion's ``prompt`` or a chat request's ``messages`` (rendered as
``/v1/chat/completions`` renders them), so a client can count a prompt's tokens against
``max_model_len`` before sending it.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from neuron_llm.serve.errors import ClientError
from neuron_llm.serve.openai_routes import ERROR_RESPONSES
from neuron_llm.serve.prompts import chat_text, model_tokenizer, unicode_text
from neuron_llm.serve.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeRequest,
    TokenizeResponse,
)
from neuron_llm.serve.state import get_state

router = APIRouter(responses=ERROR_RESPONSES)


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    """The token ids of a prompt or a conversation."""
    model = get_state(request).ready_model()
    model.check_name(body.model)
    if isinstance(body, TokenizeChatRequest):
        text, param = await asyncio.to_thread(chat_text, model, body), "messages"
    else:
        text, param = unicode_text(body.prompt, "prompt"), "prompt"
    tokenizer = model_tokenizer(model, param)
    # In a thread, as the generation routes tokenize: a long text takes a while.
    token_ids = await asyncio.to_thread(tokenizer.encode, text, add_special_tokens=body.add_special_tokens)
    get_state(request).metrics.count_request("success")
    return TokenizeResponse(
        count=len(token_ids),
        max_model_len=model.max_model_len,
        tokens=token_ids,
        token_strs=tokenizer.convert_ids_to_tokens(token_ids) if body.return_token_strs else None,
    )


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    """The text of token ids, special tokens included."""
    model = get_state(request).ready_model()
    model.check_name(body.model)
    tokenizer = model_tokenizer(model, "tokens")
    outside = [token_id for token_id in body.tokens if token_id >= len(tokenizer)]
    if outside:
        raise ClientError(f"tokens: {outside[:5]} are not in the vocabulary [0, {len(tokenizer)})", "tokens")
    text = tokenizer.decode(body.tokens, clean_up_tokenization_spaces=False)
    get_state(request).metrics.count_request("success")
    return DetokenizeResponse(prompt=text)

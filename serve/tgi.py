"""SageMaker's TGI-style body, ``{"inputs": "...", "parameters": {...}}``, answered as TGI does."""

from __future__ import annotations

import uuid

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from neuron_llm.serve.generation import Generation, sampled, unless_disconnected
from neuron_llm.serve.prompts import checked_structure, completion_prompts, output_budget, sampling_params, truncated
from neuron_llm.serve.protocol import TGIDetails, TGIGeneration, TGIRequest
from neuron_llm.serve.state import ServerState

DEFAULT_MAX_NEW_TOKENS = 100
"""Tokens generated when ``max_new_tokens`` is not set."""

_FINISH_REASONS = {"length": "length", "stop": "eos_token"}
"""TGI's names of our finish reasons; a stop string is TGI's "stop_sequence"."""
_GRAMMAR_PARAM = "parameters.grammar"

_PARAMS = {
    "max_tokens": "parameters.max_new_tokens",
    "temperature": "parameters.temperature",
    "top_p": "parameters.top_p",
    "top_k": "parameters.top_k",
    "seed": "parameters.seed",
    "stop": "parameters.stop",
    "repetition_penalty": "parameters.repetition_penalty",
    "frequency_penalty": "parameters.frequency_penalty",
}
"""The request field that sets each ``SamplingParams`` field, named in errors."""


async def serve_tgi(state: ServerState, body: TGIRequest, request: Request) -> Response:
    """Answer ``[{"generated_text": ..., "details": ...}]`` as TGI's SageMaker containers do."""
    model = state.ready_model()
    p = body.parameters
    prompts = truncated(model, await completion_prompts(model, body.inputs, "inputs"), p.truncate)
    # TGI samples when asked to, or when a setting changes the distribution (a temperature
    # of 1 or a top_p of 1 does not); otherwise it is greedy.
    do_sample = (
        p.do_sample
        or p.temperature not in (None, 1.0)
        or (p.top_p is not None and p.top_p < 1.0)
        or p.top_k is not None
    )
    max_new_tokens = p.max_new_tokens
    if max_new_tokens is None:
        # The room the prompt leaves, checked first: a prompt filling the context is refused
        # as too long, not for a max_new_tokens the client never sent.
        max_new_tokens = min(DEFAULT_MAX_NEW_TOKENS, output_budget(model, prompts, None, "inputs"))
    params = sampling_params(
        model,
        renames=_PARAMS,
        temperature=(p.temperature or 1.0) if do_sample else 0.0,
        top_p=p.top_p or 1.0,
        top_k=p.top_k or 0,
        seed=p.seed,
        max_tokens=output_budget(model, prompts, max_new_tokens, "inputs", _PARAMS["max_tokens"]),
        stop=p.stop,
        # TGI's text holds the stop sequence that ended it.
        include_stop_str_in_output=True,
        repetition_penalty=p.repetition_penalty or 1.0,
        frequency_penalty=p.frequency_penalty or 0.0,
        structured_outputs=await checked_structure(
            model, None if p.grammar is None else (p.grammar.structured_outputs(), _GRAMMAR_PARAM)
        ),
    )
    outputs = sampled(model.engine, prompts, params, f"tgi-{uuid.uuid4().hex}")
    generation = Generation(outputs, state.metrics, "inputs", _GRAMMAR_PARAM)
    await unless_disconnected(request, generation.start())
    (final,) = await unless_disconnected(request, generation.final_outputs(1))
    completion = final.outputs[0]
    details = None
    if p.details:
        reason = _FINISH_REASONS[completion.finish_reason or "length"]
        if isinstance(completion.stop_reason, str):
            reason = "stop_sequence"
        # As TGI: a seed only where it drew the tokens.
        seed = p.seed if do_sample else None
        details = TGIDetails(finish_reason=reason, generated_tokens=len(completion.token_ids), seed=seed)
    text = body.inputs + completion.text if p.return_full_text else completion.text
    return JSONResponse([TGIGeneration(generated_text=text, details=details).model_dump(exclude_none=True)])

"""Requests into engine inputs: token ids and ``SamplingParams``, checked before the engine sees them.

Every check here raises ``ClientError`` naming the request field at fault, so that what
reaches the engine is a request it accepts.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, cast

from transformers import PreTrainedTokenizerBase

from neuron_llm.loader import render_chat
from neuron_llm.loader.tokenizer import checked_unicode
from neuron_llm.sample.structured import GrammarError
from neuron_llm.sampling_params import SamplingParams, StructuredOutputsParams, truncated_prompt
from neuron_llm.serve.errors import ClientError, ServerError, error_from_value_error
from neuron_llm.serve.protocol import ChatTemplateOptions
from neuron_llm.serve.state import ServedModel


@dataclass(frozen=True)
class Prompt:
    """One prompt as the engine gets it."""

    token_ids: list[int]
    text: str
    """The prompt's text, for ``echo``: decoded when the request sent token ids."""


async def completion_prompts(
    model: ServedModel, prompt: str | list[str] | list[int] | list[list[int]], param: str = "prompt"
) -> list[Prompt]:
    """The prompts of a completion request: a text, texts, token ids or lists of token ids.

    ``param`` is the request field that holds them, named in errors. Tokenizing runs in a
    thread (the fast tokenizers release the GIL): a long prompt, even one then refused as too
    long, takes a second or more, and on the event loop it would stall every other stream.
    """
    return await asyncio.to_thread(_completion_prompts, model, prompt, param)


def _completion_prompts(
    model: ServedModel, prompt: str | list[str] | list[int] | list[list[int]], param: str
) -> list[Prompt]:
    batch: list[str | list[int]]
    if isinstance(prompt, str):
        batch = [prompt]
    elif prompt and all(isinstance(item, int) for item in prompt):
        batch = [cast("list[int]", prompt)]
    else:
        batch = [cast("str | list[int]", item) for item in prompt]
    if not batch:
        raise ClientError(f"{param} is empty", param)
    limit = model.engine.max_waiting_requests
    if len(batch) > limit:
        # Each prompt waits in the queue; more than it holds could never be accepted.
        raise ClientError(f"{param} holds {len(batch)} prompts; this server takes at most {limit} at once", param)
    return [
        _completion_prompt(model, item, param if len(batch) == 1 else f"{param}[{i}]") for i, item in enumerate(batch)
    ]


def _completion_prompt(model: ServedModel, prompt: str | list[int], param: str) -> Prompt:
    tokenizer = model.tokenizer
    if isinstance(prompt, str):
        # An empty text is a prompt where the tokenizer adds BOS (as vLLM and OpenAI serve it).
        if tokenizer is None:
            raise ClientError("this model has no tokenizer: send the prompt as token ids", param)
        token_ids = tokenizer.encode(unicode_text(prompt, param))
        if not token_ids:
            raise ClientError(f"{param} has no tokens", param)
        return Prompt(_in_vocabulary(model, token_ids, param), prompt)
    if not prompt:
        raise ClientError(f"{param} is empty", param)
    return _decoded(model, _in_vocabulary(model, prompt, param))


def _decoded(model: ServedModel, token_ids: list[int]) -> Prompt:
    # Verbatim (no clean-up of spaces), as the engine decodes: echoed text and offsets agree.
    tokenizer = model.tokenizer
    text = "" if tokenizer is None else tokenizer.decode(token_ids, clean_up_tokenization_spaces=False)
    return Prompt(token_ids, text)


def truncated(model: ServedModel, prompts: list[Prompt], keep: int | None) -> list[Prompt]:
    """``prompts`` cut to their last ``keep`` tokens (vLLM's truncate_prompt_tokens, -1: as
    many as leave room for one output token; None: uncut). A cut prompt's text, which ``echo``
    returns, is its remaining tokens decoded."""
    if keep is None:
        return prompts
    cut = [truncated_prompt(prompt.token_ids, keep, model.max_model_len) for prompt in prompts]
    return [_decoded(model, ids) if len(ids) < len(prompt.token_ids) else prompt for ids, prompt in zip(cut, prompts)]


def _in_vocabulary(model: ServedModel, token_ids: list[int], param: str) -> list[int]:
    # Text too: a tokenizer may know more tokens (added ones) than the model has embeddings for.
    bad = [token_id for token_id in token_ids if not 0 <= token_id < model.vocab_size]
    if bad:
        raise ClientError(f"{param}: token ids {bad[:5]} are not in the vocabulary [0, {model.vocab_size})", param)
    return list(token_ids)


async def chat_prompt(model: ServedModel, request: ChatTemplateOptions) -> Prompt:
    """The prompt of a conversation, rendered by the model's chat template with the request's
    options (in a thread, as ``completion_prompts`` tokenizes)."""
    return await asyncio.to_thread(_chat_prompt, model, request)


def _chat_prompt(model: ServedModel, request: ChatTemplateOptions) -> Prompt:
    text = chat_text(model, request)  # refuses a model without a tokenizer
    # The template writes any BOS itself; encoding must not add another.
    token_ids = model_tokenizer(model, "messages").encode(text, add_special_tokens=False)
    return Prompt(_in_vocabulary(model, token_ids, "messages"), text)


def chat_text(model: ServedModel, request: ChatTemplateOptions) -> str:
    """A conversation rendered by the model's chat template; ``ClientError`` naming the field at fault."""
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ClientError("this model has no tokenizer, so it has no chat template; use /v1/completions", "messages")
    options = request.template_options()
    if options["add_generation_prompt"] and options["continue_final_message"]:
        why = "add_generation_prompt and continue_final_message exclude each other: set one false"
        raise ClientError(why, "continue_final_message")
    try:
        text = render_chat(tokenizer, [message.for_template() for message in request.messages], **options)
    except ValueError as e:
        raise ClientError(str(e), "messages") from e
    return text


def model_tokenizer(model: ServedModel, param: str) -> PreTrainedTokenizerBase:
    """The model's tokenizer; ``ClientError`` naming ``param`` when it has none."""
    if model.tokenizer is None:
        raise ClientError("this model has no tokenizer: it takes and gives token ids only", param)
    return model.tokenizer


def unicode_text(text: str, param: str) -> str:
    """``text``, refused (naming ``param``) unless it is Unicode text a tokenizer can encode."""
    try:
        return checked_unicode(text, param)
    except ValueError as e:
        raise ClientError(str(e), param) from None


def output_budget(
    model: ServedModel,
    prompts: list[Prompt],
    max_tokens: int | None,
    prompt_param: str,
    max_tokens_param: str = "max_tokens",
) -> int:
    """``max_tokens`` checked against the context length; when None, the room the longest prompt leaves.

    ``max_tokens`` 0 (scoring the prompt, as lm-eval-harness asks) takes prompts as long as the
    context, unless the KV pool sets the context length (it must then hold the prompt and one token).
    """
    index = max(range(len(prompts)), key=lambda i: len(prompts[i].token_ids))
    longest = len(prompts[index].token_ids)
    if len(prompts) > 1:
        prompt_param = f"{prompt_param}[{index}]"
    limit = model.max_model_len
    if longest > limit or (longest == limit and (max_tokens != 0 or not model.scores_full_context)):
        raise ClientError(
            f"{prompt_param} is {longest} tokens, but this model's context length is {limit} tokens, "
            "which leaves no room for output; shorten it",
            prompt_param,
            "context_length_exceeded",
        )
    # Checked here, for every prompt at once: the engine refuses one prompt of a batch only
    # as it adds it, when the batch's other prompts may have started answering.
    if model.max_prompt_len is not None and longest > model.max_prompt_len:
        raise ClientError(
            f"{prompt_param} is {longest} tokens, but this server runs prompts of at most "
            f"{model.max_prompt_len} tokens (max_num_batched_tokens, chunked prefill off); shorten it",
            prompt_param,
            "context_length_exceeded",
        )
    if max_tokens is None:
        return limit - longest
    if longest + max_tokens > limit:
        raise ClientError(
            f"this model's context length is {limit} tokens, but {longest + max_tokens} were requested "
            f"({longest} in {prompt_param}, {max_tokens} for the output); "
            f"lower {max_tokens_param} or shorten {prompt_param}",
            max_tokens_param,
            "context_length_exceeded",
        )
    return max_tokens


SAMPLING_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
"""The request fields that take the model's ``generation_config.json`` value when unset, as in vLLM."""


async def checked_structure(
    model: ServedModel, held: tuple[StructuredOutputsParams, str] | None
) -> StructuredOutputsParams | None:
    """A request's structured output (``_SamplingRequest.structured``), compiled before the
    request is queued, in a thread (a large schema takes tens of milliseconds, which the
    engine's thread then does not spend); ``ClientError`` naming the request field that asked
    for it when its schema, regex or grammar is invalid."""
    if held is None:
        return None
    params, field = held
    try:
        await asyncio.to_thread(model.llm.engine.compile_structure, params)
    except ImportError as e:
        raise ServerError(str(e), code="missing_dependency") from e
    except ValueError as e:  # named as the request names it, not as the engine's params do
        raise ClientError(f"{field}: {e.reason if isinstance(e, GrammarError) else e}", field) from e
    return params


def sampling_params(
    model: ServedModel,
    renames: dict[str, str] | None = None,
    unset: Collection[str] = (),
    **fields: Any,
) -> SamplingParams:
    """``SamplingParams(**fields)``; a refused value is a ``ClientError`` naming the request field.

    ``renames`` maps a ``SamplingParams`` field to the request field that set it, where their
    names differ (chat's ``top_logprobs`` sets ``logprobs``). Fields of ``SAMPLING_DEFAULTS``
    named in ``unset`` (the request left them out) take the model's defaults; the OpenAI routes
    pass them, TGI-style bodies keep TGI's own defaults.
    """
    renames = renames or {}
    defaults = model.llm.generation_defaults
    fields.update({name: defaults[name] for name in SAMPLING_DEFAULTS if name in unset and name in defaults})
    if fields.get("stop") and model.tokenizer is None:
        param = renames.get("stop", "stop")
        raise ClientError(f"{param}: stop strings need a tokenizer, and this model has none; use stop_token_ids", param)
    try:
        return SamplingParams(**fields)
    except ValueError as e:
        raise renamed_error(e, renames) from e


def renamed_error(error: ValueError, renames: dict[str, str]) -> ClientError:
    """The ``ClientError`` of a parameters class's ``error``, naming fields as the request does
    ("max_completion_tokens=3", not "max_tokens=3"): ``renames`` maps the class's to the request's."""
    client_error = error_from_value_error(error)
    if client_error.param is not None:
        client_error.param = renames.get(client_error.param, client_error.param)
    for field, request_field in renames.items():
        client_error.message = re.sub(rf"\b{field}=", f"{request_field}=", client_error.message)
    return client_error

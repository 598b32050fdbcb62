"""``/v1/chat/completions``: a conversation through the model's chat template, reply whole or streamed."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import replace

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from neuron_llm.outputs import Logprob, RequestOutput
from neuron_llm.serve.beam_search import beam_search_params, beam_searched
from neuron_llm.serve.errors import ClientError, ServeError
from neuron_llm.serve.generation import EventStreamResponse, Generation, sampled, unless_disconnected
from neuron_llm.serve.logprobs import chat_logprobs, prompt_logprobs
from neuron_llm.serve.prompts import Prompt, chat_prompt, checked_structure, output_budget, sampling_params, truncated
from neuron_llm.serve.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatStreamChoice,
    ToolCallDelta,
    UsageInfo,
)
from neuron_llm.serve.state import ServedModel, ServerState
from neuron_llm.serve.streaming import DONE_EVENT, ChoiceDelta, DeltaTracker, error_event, event
from neuron_llm.serve.tools import TOOL_CALL_PARSERS, ToolCalling


async def serve_chat(state: ServerState, body: ChatCompletionRequest, request: Request) -> Response:
    """Answer a chat completion request: JSON, or server-sent events when ``stream`` is set."""
    model = state.ready_model()
    model.check_name(body.model)
    max_tokens, max_tokens_param = body.max_tokens, "max_tokens"
    if body.max_completion_tokens is not None:
        max_tokens, max_tokens_param = body.max_completion_tokens, "max_completion_tokens"
    tools = None if body.use_beam_search else _tool_calling(state, body)
    (prompt,) = truncated(model, [await chat_prompt(model, body)], body.truncate_prompt_tokens)
    response_id = f"chatcmpl-{uuid.uuid4().hex}"
    if body.use_beam_search:
        budget = output_budget(model, [prompt], max_tokens, "messages", max_tokens_param)
        params = beam_search_params(body, budget, max_tokens_param)
        outputs = beam_searched(
            model.engine, [prompt], [params], response_id, model.tokenizer, body.skip_special_tokens
        )
        generation = Generation(outputs, state.metrics, "messages")
    else:
        generation = await _sampled(state, model, body, prompt, tools, max_tokens, max_tokens_param, response_id)
    writer = _ChatWriter(model, body, prompt, response_id, tools)
    await unless_disconnected(request, generation.start())
    if body.stream:
        return EventStreamResponse(writer.events(generation, state), generation)
    (final,) = await unless_disconnected(request, generation.final_outputs(1))
    # Off the event loop: a long prompt's scored logprobs take a while to write out.
    return await asyncio.to_thread(lambda: JSONResponse(writer.response(final).model_dump()))


def _tool_calling(state: ServerState, body: ChatCompletionRequest) -> ToolCalling | None:
    """The request's tool calling, refused before its template is rendered if it cannot be served."""
    tools = ToolCalling.of(body)
    if tools is not None and tools.kind == "auto" and state.settings.tool_call_parser is None:
        raise ClientError(
            'tool_choice "auto" (the default with tools) needs the server started with --tool-call-parser '
            f'({", ".join(TOOL_CALL_PARSERS)}); or set tool_choice to "required", a function, or "none"',
            "tool_choice",
        )
    return tools


async def _sampled(
    state: ServerState,
    model: ServedModel,
    body: ChatCompletionRequest,
    prompt: Prompt,
    tools: ToolCalling | None,
    max_tokens: int | None,
    max_tokens_param: str,
    response_id: str,
) -> Generation:
    structure = body.structured
    if tools is not None and tools.kind != "auto":
        structure = (tools.structure(), "tools")
    num_top = body.top_logprobs or 0
    params = sampling_params(
        model,
        unset=type(body).model_fields.keys() - body.model_fields_set,
        renames={"logprobs": "top_logprobs", "max_tokens": max_tokens_param},
        n=body.n,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        seed=body.seed,
        max_tokens=output_budget(model, [prompt], max_tokens, "messages", max_tokens_param),
        min_tokens=body.min_tokens,
        stop=body.stop,
        stop_token_ids=body.stop_token_ids,
        logit_bias=body.logit_bias,
        allowed_token_ids=body.allowed_token_ids,
        bad_words=body.bad_words,
        structured_outputs=await checked_structure(model, structure),
        prompt_logprobs=body.prompt_logprobs,
        ignore_eos=body.ignore_eos,
        include_stop_str_in_output=body.include_stop_str_in_output,
        skip_special_tokens=body.skip_special_tokens,
        logprobs=num_top if body.logprobs else None,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty,
    )
    outputs = sampled(model.engine, [prompt], params, response_id)
    return Generation(outputs, state.metrics, "messages", None if structure is None else structure[1])


class _ChatWriter:
    """Builds the response of one chat request from engine outputs."""

    def __init__(
        self,
        model: ServedModel,
        body: ChatCompletionRequest,
        prompt: Prompt,
        response_id: str,
        tools: ToolCalling | None,
    ) -> None:
        self._model = model
        self._body = body
        self._prompt = prompt
        self._id = response_id
        self._created = int(time.time())
        self._texts = model.token_texts
        self._tools = tools
        self._held: dict[int, list[ChoiceDelta]] = {}
        """In a stream with tools, per choice, what is held back until it is known whether the
        reply is tool calls (sent whole once it ends) or content (sent on as it comes)."""
        self._content: set[int] = set()
        """The choices of such a stream known to be content."""

    def response(self, final: RequestOutput) -> ChatCompletionResponse:
        choices = []
        for completion in final.outputs:
            calls = None if self._tools is None else self._tools.calls(completion.text)
            finish_reason = completion.finish_reason
            if self._tools is not None:
                finish_reason = self._tools.finish_reason(finish_reason, calls)
            message = AssistantMessage(content=None if calls else completion.text, tool_calls=calls or [])
            logprobs = self._logprobs(completion.token_ids, completion.logprobs)
            token_ids = completion.token_ids if self._body.return_token_ids else None
            choices.append(
                ChatChoice(
                    index=completion.index,
                    message=message,
                    logprobs=logprobs,
                    finish_reason=finish_reason,
                    stop_reason=completion.stop_reason,
                    token_ids=token_ids,
                )
            )
        num_generated = sum(len(completion.token_ids) for completion in final.outputs)
        return ChatCompletionResponse(
            id=self._id,
            created=self._created,
            model=self._model.name,
            choices=choices,
            usage=self._usage(num_generated, final.num_cached_tokens),
            prompt_token_ids=self._prompt.token_ids if self._body.return_token_ids else None,
            prompt_logprobs=None
            if self._body.prompt_logprobs is None
            else prompt_logprobs(self._texts, final.prompt_logprobs or []),
        )

    async def events(self, generation: Generation, state: ServerState) -> AsyncGenerator[str, None]:
        # Each choice opens with the assistant's role, and each chunk carries one choice, as
        # OpenAI's and vLLM's streams do: clients that read ``choices[0]`` lose nothing.
        continuous = self._body.continuous_usage
        _, first = generation.first_output  # the request is scheduled: its cached tokens are known
        for i in range(self._body.n):
            role = ChatStreamChoice(index=i, delta=ChatDelta(role="assistant", content=""))
            chunk = self._chunk([role], self._usage(0, first.num_cached_tokens) if continuous else None)
            if self._body.return_token_ids:  # on every choice's first chunk, as in vLLM
                chunk.prompt_token_ids = self._prompt.token_ids
            yield event(chunk)
        tracker = DeltaTracker(self._body.n, has_logprobs=self._body.logprobs)
        async with contextlib.aclosing(generation.outputs()) as outputs:
            try:
                async for prompt_index, output in outputs:
                    for delta in tracker.deltas(prompt_index, output):
                        if self._tools is not None and delta.index not in self._content:
                            delta, calls = self._held_back(delta, self._tools)
                            if delta is None:
                                continue
                        else:
                            calls = None
                        choice = ChatStreamChoice(
                            index=delta.index,
                            delta=ChatDelta(content=None if calls else delta.text, tool_calls=calls),
                            logprobs=self._logprobs(delta.token_ids, delta.logprobs),
                            finish_reason=delta.finish_reason,
                            stop_reason=delta.stop_reason,
                            token_ids=delta.token_ids if self._body.return_token_ids else None,
                        )
                        usage = self._usage(delta.num_tokens, tracker.cached_tokens()) if continuous else None
                        yield event(self._chunk([choice], usage))
            except ServeError as e:
                state.metrics.count_refusal(e.status_code)
                yield error_event(e)
                yield DONE_EVENT
                return
        if self._body.include_usage:
            yield event(self._chunk([], self._usage(tracker.num_generated_tokens, tracker.cached_tokens())))
        yield DONE_EVENT

    def _held_back(
        self, delta: ChoiceDelta, tools: ToolCalling
    ) -> tuple[ChoiceDelta | None, list[ToolCallDelta] | None]:
        """What to send of a choice that may be tool calls: nothing while it may still be
        (None), what was held as content once it cannot be, its calls once it ends as them."""
        held = self._held.setdefault(delta.index, [])
        held.append(delta)
        whole = ChoiceDelta.joined(held)
        may_be_calls = tools.may_be_calls(whole.text)
        if may_be_calls is False:
            self._content.add(delta.index)
        elif whole.finish_reason is None:
            return None, None
        del self._held[delta.index]
        calls = tools.calls(whole.text) if may_be_calls else None
        if calls is None:
            return whole, None
        whole = replace(whole, finish_reason=tools.finish_reason(whole.finish_reason, calls))
        return whole, [ToolCallDelta(index=i, id=call.id, function=call.function) for i, call in enumerate(calls)]

    def _logprobs(self, token_ids: list[int], logprobs: list[dict[int, Logprob]] | None) -> ChatLogprobs | None:
        if not self._body.logprobs or logprobs is None:
            return None
        return chat_logprobs(self._texts, token_ids, logprobs, self._body.top_logprobs or 0)

    def _chunk(self, choices: list[ChatStreamChoice], usage: UsageInfo | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self._id, created=self._created, model=self._model.name, choices=choices, usage=usage
        )

    def _usage(self, num_generated: int, cached_tokens: int | None) -> UsageInfo:
        return UsageInfo.of(len(self._prompt.token_ids), num_generated, cached_tokens)

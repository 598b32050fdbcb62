"""``/v1/completions``: prompts in, text out, whole or streamed."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import replace

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from neuron_llm.outputs import PromptLogprobs, RequestOutput
from neuron_llm.serve.beam_search import beam_search_params, beam_searched
from neuron_llm.serve.errors import ServeError
from neuron_llm.serve.generation import EventStreamResponse, Generation, sampled, unless_disconnected
from neuron_llm.serve.logprobs import TextOffsets, completion_logprobs, prompt_logprobs, prompt_text_offsets
from neuron_llm.serve.prompts import (
    Prompt,
    checked_structure,
    completion_prompts,
    output_budget,
    sampling_params,
    truncated,
)
from neuron_llm.serve.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
)
from neuron_llm.serve.state import ServedModel, ServerState
from neuron_llm.serve.streaming import DONE_EVENT, ChoiceDelta, DeltaTracker, error_event, event


async def serve_completion(state: ServerState, body: CompletionRequest, request: Request) -> Response:
    """Answer a completion request: JSON, or server-sent events when ``stream`` is set."""
    model = state.ready_model()
    model.check_name(body.model)
    prompts = truncated(model, await completion_prompts(model, body.prompt), body.truncate_prompt_tokens)
    response_id = f"cmpl-{uuid.uuid4().hex}"
    if body.use_beam_search:
        generation = _beam_search(state, model, body, prompts, response_id)
    else:
        generation = await _sampled(state, model, body, prompts, response_id)
    writer = _CompletionWriter(model, body, prompts, response_id)
    await unless_disconnected(request, generation.start())
    if body.stream:
        return EventStreamResponse(writer.events(generation, state), generation)
    finals = await unless_disconnected(request, generation.final_outputs(len(prompts)))
    # Off the event loop: a long prompt's echoed or scored logprobs take a while to write out.
    return await asyncio.to_thread(lambda: JSONResponse(writer.response(finals).model_dump()))


async def _sampled(
    state: ServerState, model: ServedModel, body: CompletionRequest, prompts: list[Prompt], response_id: str
) -> Generation:
    structure = body.structured
    params = sampling_params(
        model,
        unset=type(body).model_fields.keys() - body.model_fields_set,
        n=body.n,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        seed=body.seed,
        # Scoring a prompt generates one token, which is dropped.
        max_tokens=output_budget(model, prompts, body.max_tokens, "prompt") or 1,
        min_tokens=body.min_tokens,
        stop=body.stop,
        stop_token_ids=body.stop_token_ids,
        logit_bias=body.logit_bias,
        allowed_token_ids=body.allowed_token_ids,
        bad_words=body.bad_words,
        structured_outputs=await checked_structure(model, structure),
        ignore_eos=body.ignore_eos,
        include_stop_str_in_output=body.include_stop_str_in_output,
        skip_special_tokens=body.skip_special_tokens,
        logprobs=body.logprobs,
        # Echoed prompts come with their own logprobs, as in OpenAI's API.
        prompt_logprobs=body.num_prompt_logprobs,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty,
    )
    per_prompt = [
        params if body.max_tokens is not None else replace(params, max_tokens=_max_tokens(model, body, p))
        for p in prompts
    ]
    outputs = sampled(model.engine, prompts, per_prompt, response_id)
    return Generation(outputs, state.metrics, structure_param=None if structure is None else structure[1])


def _beam_search(
    state: ServerState, model: ServedModel, body: CompletionRequest, prompts: list[Prompt], response_id: str
) -> Generation:
    output_budget(model, prompts, body.max_tokens, "prompt")  # refuses any prompt too long, naming it
    params = [beam_search_params(body, _max_tokens(model, body, p)) for p in prompts]
    outputs = beam_searched(model.engine, prompts, params, response_id, model.tokenizer, body.skip_special_tokens)
    return Generation(outputs, state.metrics)


def _max_tokens(model: ServedModel, body: CompletionRequest, prompt: Prompt) -> int:
    """``max_tokens``, or left unset, the room ``prompt`` leaves: each prompt may run to the end
    of the context (not the longest one's), as in vLLM."""
    return model.max_model_len - len(prompt.token_ids) if body.max_tokens is None else body.max_tokens


class _CompletionWriter:
    """Builds the response of one completion request from engine outputs."""

    def __init__(self, model: ServedModel, body: CompletionRequest, prompts: list[Prompt], response_id: str) -> None:
        self._model = model
        self._body = body
        self._prompts = prompts
        self._id = response_id
        self._created = int(time.time())
        self._texts = model.token_texts
        self._text_offsets: dict[int, TextOffsets] = {}
        """Per choice, where its tokens begin in its text: a stream's chunks carry on from there."""

    def response(self, finals: list[RequestOutput]) -> CompletionResponse:
        choices = []
        for prompt_index, output in enumerate(finals):
            for completion in output.outputs:
                delta = ChoiceDelta(
                    index=prompt_index * self._body.n + completion.index,
                    text=completion.text,
                    token_ids=completion.token_ids,
                    logprobs=completion.logprobs,
                    finish_reason=completion.finish_reason,
                    stop_reason=completion.stop_reason,
                    is_first=True,
                    num_tokens=len(completion.token_ids),
                )
                choices.append(self._choice(delta, output.prompt_logprobs))
        num_generated = sum(len(c.token_ids) for output in finals for c in output.outputs)
        cached = [output.num_cached_tokens for output in finals if output.num_cached_tokens is not None]
        usage = self._usage(0 if self._body.scores_only else num_generated, sum(cached) if cached else None)
        return self._chunk(choices, usage)

    async def events(self, generation: Generation, state: ServerState) -> AsyncGenerator[str, None]:
        tracker = DeltaTracker(self._body.n, has_logprobs=self._body.logprobs is not None)
        # Only a prompt's first delta output has its prompt logprobs; each choice echoes them.
        prompt_scores: dict[int, PromptLogprobs | None] = {}
        async with contextlib.aclosing(generation.outputs()) as outputs:
            try:
                async for prompt_index, output in outputs:
                    prompt_scores.setdefault(prompt_index, output.prompt_logprobs)
                    # One choice a chunk, as OpenAI's and vLLM's streams send them.
                    for delta in tracker.deltas(prompt_index, output):
                        usage = self._choice_usage(delta, tracker) if self._body.continuous_usage else None
                        choice = await self._stream_choice(delta, prompt_scores[prompt_index])
                        yield event(self._chunk([choice], usage))
            except ServeError as e:
                state.metrics.count_refusal(e.status_code)
                yield error_event(e)
                yield DONE_EVENT
                return
        if self._body.include_usage:
            num_generated = 0 if self._body.scores_only else tracker.num_generated_tokens
            yield event(self._chunk([], self._usage(num_generated, tracker.cached_tokens())))
        yield DONE_EVENT

    async def _stream_choice(self, delta: ChoiceDelta, prompt_scores: PromptLogprobs | None) -> CompletionChoice:
        """``_choice``, off the event loop where it echoes the prompt with its logprobs (long
        prompts take a while)."""
        if self._body.echo and delta.is_first and self._body.logprobs is not None:
            return await asyncio.to_thread(self._choice, delta, prompt_scores)
        return self._choice(delta, prompt_scores)

    def _choice(self, delta: ChoiceDelta, prompt_scores: PromptLogprobs | None) -> CompletionChoice:
        if self._body.scores_only:
            logprobs = None if delta.logprobs is None else []
            finish_reason = "length" if delta.finish_reason else None
            delta = replace(
                delta, text="", token_ids=[], logprobs=logprobs, finish_reason=finish_reason, stop_reason=None
            )
        prompt = self._prompts[delta.index // self._body.n]
        echo = self._body.echo and delta.is_first
        text = prompt.text + delta.text if echo else delta.text
        logprobs = None
        if self._body.logprobs is not None:
            logprobs = self._logprobs(delta, prompt, prompt_scores) if echo else self._output_logprobs(delta, prompt)
        choice = CompletionChoice(
            index=delta.index,
            text=text,
            logprobs=logprobs,
            finish_reason=delta.finish_reason,
            stop_reason=delta.stop_reason,
        )
        if self._body.return_token_ids:
            choice.token_ids = delta.token_ids
            choice.prompt_token_ids = prompt.token_ids if delta.is_first else None
        if not self._body.stream and self._body.num_prompt_logprobs is not None:
            choice.prompt_logprobs = prompt_logprobs(self._texts, prompt_scores or [])
        return choice

    def _output_logprobs(self, delta: ChoiceDelta, prompt: Prompt) -> CompletionLogprobs:
        if delta.index not in self._text_offsets:
            self._text_offsets[delta.index] = TextOffsets(
                self._texts, skip_special_tokens=self._body.skip_special_tokens, context_token_ids=prompt.token_ids
            )
        offsets = self._text_offsets[delta.index](delta.token_ids)
        return completion_logprobs(self._texts, delta.token_ids, delta.logprobs or [], offsets)

    def _logprobs(self, delta: ChoiceDelta, prompt: Prompt, prompt_scores: PromptLogprobs | None) -> CompletionLogprobs:
        """Logprobs of the echoed prompt followed by those of the generated tokens."""
        tokenizer = self._model.tokenizer
        prompt_offsets = prompt_text_offsets(self._texts, tokenizer, prompt.text, prompt.token_ids)
        prompt_part = completion_logprobs(
            self._texts, prompt.token_ids, prompt_scores or [], prompt_offsets, self._body.logprobs
        )
        self._text_offsets[delta.index] = TextOffsets(
            self._texts,
            start=len(prompt.text),
            skip_special_tokens=self._body.skip_special_tokens,
            context_token_ids=prompt.token_ids,
        )
        output_part = self._output_logprobs(delta, prompt)
        return CompletionLogprobs(
            tokens=prompt_part.tokens + output_part.tokens,
            token_logprobs=prompt_part.token_logprobs + output_part.token_logprobs,
            top_logprobs=prompt_part.top_logprobs + output_part.top_logprobs,
            text_offset=prompt_part.text_offset + output_part.text_offset,
        )

    def _chunk(self, choices: list[CompletionChoice], usage: UsageInfo | None) -> CompletionResponse:
        return CompletionResponse(
            id=self._id, created=self._created, model=self._model.name, choices=choices, usage=usage
        )

    def _usage(self, num_generated: int, cached_tokens: int | None) -> UsageInfo:
        return UsageInfo.of(sum(len(prompt.token_ids) for prompt in self._prompts), num_generated, cached_tokens)

    def _choice_usage(self, delta: ChoiceDelta, tracker: DeltaTracker) -> UsageInfo:
        """One choice's usage so far: its prompt and its tokens, as vLLM's continuous usage counts them."""
        num_generated = 0 if self._body.scores_only else delta.num_tokens
        prompt_index = delta.index // self._body.n
        return UsageInfo.of(
            len(self._prompts[prompt_index].token_ids), num_generated, tracker.cached_tokens(prompt_index)
        )

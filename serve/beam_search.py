"""vLLM's ``use_beam_search`` in completions and chat completions.

A prompt's ``n`` best beams (``AsyncLLM.beam_search``) are its ``n`` choices, whole: a stream
sends each choice in one chunk once the search has ended, as vLLM's does. Options that shape
sampling mean nothing to a beam search, so they are refused by name rather than ignored.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence

from transformers import PreTrainedTokenizerBase

from neuron_llm.beam_search import BeamSearchOutput, BeamSearchParams
from neuron_llm.detokenizer import IncrementalDetokenizer
from neuron_llm.engine.async_llm import AsyncLLM, gather_or_cancel
from neuron_llm.outputs import CompletionOutput, RequestOutput
from neuron_llm.serve.errors import ClientError
from neuron_llm.serve.generation import IndexedOutput
from neuron_llm.serve.prompts import Prompt, renamed_error
from neuron_llm.serve.protocol import ChatCompletionRequest, CompletionRequest

REFUSED = (
    "top_p",
    "top_k",
    "min_p",
    "min_tokens",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "stop",
    "stop_token_ids",
    "logit_bias",
    "allowed_token_ids",
    "bad_words",
    "logprobs",
    "top_logprobs",
    "prompt_logprobs",
    "tools",
    "tool_choice",
)
"""Request fields that a beam search refuses unless they ask for nothing: their default, null,
an empty list, or a value of ``OFF``. A ``seed`` is taken: the search is deterministic anyway."""

OFF = {"top_k": (-1,), "tool_choice": ("none",)}
"""Values besides the default that switch a field off (vLLM's ``top_k`` of -1)."""


def beam_search_params(
    body: CompletionRequest | ChatCompletionRequest, max_tokens: int, max_tokens_param: str = "max_tokens"
) -> BeamSearchParams:
    """The beam search ``body`` asks for (``use_beam_search``): ``n`` beams of up to ``max_tokens``.

    Raises ``ClientError`` naming a field that beam search cannot honour.
    """
    fields = type(body).model_fields
    for name in REFUSED:
        if name in fields and getattr(body, name) not in (fields[name].default, None, [], {}, *OFF.get(name, ())):
            raise ClientError(f"{name} is not supported with use_beam_search", name)
    if body.structured is not None:
        _, param = body.structured
        raise ClientError(f"{param} is not supported with use_beam_search", param)
    # 1 too: clients that send every field send OpenAI's default.
    if body.temperature not in (0, 1):
        raise ClientError(
            f"temperature={body.temperature}: beam search ranks beams by the model's raw log-probabilities, "
            "which a temperature does not change; leave it unset, 0 or 1",
            "temperature",
        )
    try:
        return BeamSearchParams(
            beam_width=body.n,
            max_tokens=max_tokens,
            ignore_eos=body.ignore_eos,
            length_penalty=body.length_penalty,
            include_stop_str_in_output=body.include_stop_str_in_output,
        )
    except ValueError as e:
        raise renamed_error(e, {"beam_width": "n", "max_tokens": max_tokens_param}) from e


async def beam_searched(
    engine: AsyncLLM,
    prompts: Sequence[Prompt],
    params: Sequence[BeamSearchParams],
    request_id: str,
    tokenizer: PreTrainedTokenizerBase | None,
    skip_special_tokens: bool,
) -> AsyncGenerator[IndexedOutput, None]:
    """Each prompt's beams, best first, as one finished output of ``beam_width`` completions,
    once every prompt's search has ended (searched at once, ``params`` one per prompt)."""
    results = await gather_or_cancel(
        *(
            engine.beam_search(prompt.token_ids, prompt_params, f"{request_id}-{i}")
            for i, (prompt, prompt_params) in enumerate(zip(prompts, params, strict=True))
        )
    )
    for index, (prompt, result) in enumerate(zip(prompts, results, strict=True)):
        # Off the event loop: decoding ten long beams takes long enough to stall other streams.
        output = await asyncio.to_thread(
            _request_output, f"{request_id}-{index}", prompt, result, tokenizer, skip_special_tokens
        )
        yield index, output


def _request_output(
    request_id: str,
    prompt: Prompt,
    result: BeamSearchOutput,
    tokenizer: PreTrainedTokenizerBase | None,
    skip_special_tokens: bool,
) -> RequestOutput:
    completions = []
    for index, beam in enumerate(result.sequences):
        token_ids = beam.tokens[len(prompt.token_ids) :]
        text = ""
        if tokenizer is not None:
            # The text a sampled reply of these tokens gets: decoded in the prompt's context.
            detokenizer = IncrementalDetokenizer(tokenizer, prompt.token_ids, skip_special_tokens=skip_special_tokens)
            for token_id in token_ids:
                detokenizer.add_token(token_id)
            detokenizer.finish()
            text = detokenizer.output_text
        # An EOS ends a sampled reply with no stop reason either.
        completions.append(CompletionOutput(index, text, token_ids, beam.cum_logprob, None, beam.finish_reason))
    return RequestOutput(request_id, prompt.text, prompt.token_ids, None, completions, finished=True)

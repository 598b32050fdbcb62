"""Request and response bodies: OpenAI's completions, chat and models API, and TGI's generate.

Requests are validated strictly (``"n": "2"`` or ``"n": true`` is refused, not converted) and
unknown fields are refused, so a misspelt or unsupported option is a 400 naming it instead of
being silently ignored; so is an option that would do nothing (``top_logprobs`` without
``logprobs``, ``stream_options`` without ``stream``). Null stands for an option's default.
Options of those APIs that this server lacks (``functions``, ``suffix``, TGI's ``watermark``...)
are accepted only when null or set to what leaves them off, as clients that send every field do.
Ranges follow OpenAI's API reference; the extra sampling fields (``top_k``, ``min_p``,
``min_tokens``, ``repetition_penalty``, ``ignore_eos``, ``stop_token_ids``, ``allowed_token_ids``,
``bad_words``, ``include_stop_str_in_output``, ``skip_special_tokens``, ``truncate_prompt_tokens``,
``structured_outputs``, ``use_beam_search``, ``length_penalty``) are vLLM's extensions under vLLM's names.
"""

from __future__ import annotations

import json
import typing
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    ModelWrapValidatorHandler,
    PrivateAttr,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

from neuron_llm.loader.tokenizer import NO_PARAMETERS, chat_template_arguments, tool_call_arguments
from neuron_llm.sampling_params import (
    MAX_BAD_WORD_CHARS,
    MAX_BAD_WORDS,
    MAX_LOGIT_BIAS,
    MAX_LOGPROBS,
    MAX_SEED,
    MAX_STOP_TOKEN_IDS,
    MIN_SEED,
    REPETITION_PENALTY_RANGE,
    StructuredOutputsParams,
)

MAX_N = 128
"""Most completions of one prompt (OpenAI's limit). Beyond max_num_seqs they run in turns, as in ``LLM``."""

MAX_STOP, MAX_STOP_CHARS = 16, 1024
"""Most stop strings a request takes, and their longest: the engine's thread matches every one
against each new token of the sequence, so a request with many or long ones would slow the
whole batch (OpenAI takes 4, TGI 4 by default)."""

StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]
StopStrings = Annotated[list[StopString], Field(max_length=MAX_STOP)]


def _unsupported(*off: Any) -> Any:
    """A field of the API this server does not implement, accepted when null or one of ``off``:
    the values that leave the option off (clients that send every field send those)."""
    return Field(
        None, description=f"Not supported: only {_accepted(off)} is accepted.", json_schema_extra={"off": list(off)}
    )


def _accepted(off: Sequence[Any]) -> str:
    return " or ".join(["null", *(json.dumps(value) for value in off)])


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _null_means_the_default(cls, data: Any) -> Any:
        # OpenAI's API takes null for any option left unset, and clients that send every field
        # send it: for an option that has no None value of its own, null is its default.
        if not isinstance(data, dict):
            return data
        return {name: value for name, value in data.items() if value is not None or not _null_is_its_default(cls, name)}

    @field_validator("*", mode="before")
    @classmethod
    def _unsupported_is_off(cls, value: Any, info: ValidationInfo) -> Any:
        extra = cls.model_fields[info.field_name].json_schema_extra if info.field_name else None
        off = extra.get("off") if isinstance(extra, dict) else None
        # Compared with their types: 0 and 1 are not false and true.
        if off is not None and value is not None and not any(type(value) is type(o) and value == o for o in off):
            raise ValueError(f"{info.field_name} is not supported by this server; only {_accepted(off)} is accepted")
        return value


def _null_is_its_default(cls: type[BaseModel], name: str) -> bool:
    """Whether ``name`` is a field of ``cls`` with a default and no None among its values."""
    field = cls.model_fields.get(name)
    if field is None or field.is_required():
        return False
    return field.annotation is not None and type(None) not in typing.get_args(field.annotation)


class StreamOptions(_Request):
    include_usage: bool = False
    """Send a last chunk, with empty choices, carrying the request's token usage."""
    continuous_usage_stats: bool = False
    """With include_usage, every chunk also carries its choice's usage so far (vLLM's option)."""


class JsonSchemaFormat(_Request):
    """OpenAI's ``response_format.json_schema``."""

    name: str
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    """Optional, as in OpenAI's API: left out, any JSON."""
    strict: bool | None = None
    """True: an object that does not say whether it takes properties it does not name takes
    none, as OpenAI's strict mode requires (the schema is held to either way)."""


class ResponseFormat(_Request):
    """OpenAI's ``response_format``: free text, any JSON object, or JSON of a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError('json_schema is given with "type": "json_schema", and only then')
        return self

    def structured_outputs(self) -> StructuredOutputsParams | None:
        if self.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        if self.json_schema is not None:
            schema = self.json_schema
            return StructuredOutputsParams(json=schema.schema_, disable_additional_properties=bool(schema.strict))
        return None


class StructuredOutputs(_Request):
    """vLLM's ``structured_outputs``: exactly one of these."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    """A JSON schema, or its text."""
    regex: str | None = None
    choice: list[Annotated[str, Field(min_length=1)]] | None = Field(None, min_length=1)
    grammar: str | None = None
    """A Lark grammar (llguidance's dialect)."""
    json_object: bool | None = None
    disable_additional_properties: bool = False
    """JSON schemas: an object that does not say otherwise takes no properties it does not name."""

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        given = [self.json_, self.regex, self.choice, self.grammar, self.json_object]
        if sum(value is not None and value is not False for value in given) != 1:
            raise ValueError("set exactly one of json, regex, choice, grammar, json_object")
        self.params()  # raises for JSON text that is no object
        return self

    def params(self) -> StructuredOutputsParams:
        return StructuredOutputsParams(
            json=self.json_,
            regex=self.regex,
            choice=self.choice,
            grammar=self.grammar,
            json_object=self.json_object,
            disable_additional_properties=self.disable_additional_properties,
        )


class _SamplingRequest(_Request):
    """Fields that completions and chat completions share."""

    model: str | None = None
    """The served model's name; None takes the one model this server serves."""
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: StopString | StopStrings | None = None
    seed: int | None = Field(None, ge=MIN_SEED, le=MAX_SEED)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    """Accepted for compatibility; not used."""
    safety_identifier: str | None = None
    """OpenAI's successor of ``user``; accepted, not used."""
    prompt_cache_key: str | None = None
    """OpenAI's hint for its prompt cache; accepted, not used (prefix caching needs no key)."""
    metadata: dict[str, str] | None = Field(None, max_length=16)
    """OpenAI's tags of a stored request; accepted, not used (nothing is stored)."""
    top_k: int = Field(0, ge=-1)
    min_p: float = Field(0.0, ge=0, le=1)
    min_tokens: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, ge=REPETITION_PENALTY_RANGE[0], le=REPETITION_PENALTY_RANGE[1])
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    return_token_ids: bool = False
    """vLLM's: the reply carries its token ids and its prompt's (in a stream, the prompt's in the first chunk)."""
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    """vLLM's: each prompt token's logprob and the this many most likely at its place (not in a stream)."""
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(None, max_length=MAX_LOGIT_BIAS)
    """Token id, as JSON keys are strings ("50256") -> bias added to its logit, in [-100, 100]."""
    allowed_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(None, min_length=1)
    """vLLM's: only these token ids may be generated."""
    bad_words: list[Annotated[str, Field(min_length=1, max_length=MAX_BAD_WORD_CHARS)]] | None = Field(
        None, max_length=MAX_BAD_WORDS
    )
    """vLLM's: words never generated (``SamplingParams.bad_words``)."""
    truncate_prompt_tokens: int | None = None
    """vLLM's: keep only the prompt's last this many tokens; -1 keeps as many as leave room for one output token."""
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    """vLLM's; excludes a response_format other than text."""
    use_beam_search: bool = False
    """vLLM's: the n best replies by beam search of n beams, rather than n sampled ones; refuses
    the options that shape sampling (``neuron_llm.serve.beam_search``)."""
    length_penalty: float = 1.0
    """vLLM's: with use_beam_search, beams rank by cumulative logprob / generated tokens ** length_penalty."""

    @property
    def structured(self) -> tuple[StructuredOutputsParams, str] | None:
        """The structure the text is held to, and the field that asked for it; None when free."""
        if self.structured_outputs is not None:
            return self.structured_outputs.params(), "structured_outputs"
        held = None if self.response_format is None else self.response_format.structured_outputs()
        return None if held is None else (held, "response_format")

    @field_validator("structured_outputs")
    @classmethod
    def _one_structure(cls, value: StructuredOutputs | None, info: ValidationInfo) -> StructuredOutputs | None:
        response_format = info.data.get("response_format")
        if value is not None and response_format is not None and response_format.type != "text":
            raise ValueError("structured_outputs and a response_format other than text exclude each other")
        return value

    @field_validator("length_penalty")
    @classmethod
    def _ranks_beams(cls, value: float, info: ValidationInfo) -> float:
        if value != 1.0 and not info.data.get("use_beam_search"):
            raise ValueError("length_penalty ranks beams, so it needs use_beam_search to be true")
        return value

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _a_count_or_all(cls, value: int | None) -> int | None:
        if value is not None and value < 1 and value != -1:
            raise ValueError("must be -1 (as many as leave room for one output token) or an integer >= 1")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, value: dict[str, float] | None) -> dict[int, float] | None:
        if value is None:
            return None
        bad = [key for key in value if not (key.isascii() and key.isdigit())]
        if bad:
            raise ValueError(f"keys must be token ids (integers >= 0 as strings), not {bad[:5]}")
        return {int(key): bias for key, bias in value.items()}

    @field_validator("prompt_logprobs")
    @classmethod
    def _not_streamed(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and info.data.get("stream"):  # 0 is let through, as vLLM does
            raise ValueError("prompt_logprobs are not sent in a stream (as in vLLM)")
        return value

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return value

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return self.stream and self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        """Whether every chunk of a stream carries its choice's usage so far (only with include_usage)."""
        return self.include_usage and self.stream_options.continuous_usage_stats


class CompletionRequest(_SamplingRequest):
    """``POST /v1/completions``."""

    prompt: str | list[str] | list[int] | list[list[int]]
    """A text, a batch of texts, token ids, or a batch of token id lists."""
    echo: bool = False
    max_tokens: int | None = Field(16, ge=0)
    """0 only with ``echo``: the prompt comes back with its logprobs, and nothing is generated."""
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(None, ge=1)
    """Not supported beyond its default: accepted only when null or equal to n."""
    suffix: Any = _unsupported("")

    @field_validator("max_tokens")
    @classmethod
    def _zero_only_to_echo(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value == 0 and not info.data.get("echo"):
            raise ValueError("max_tokens=0 is only allowed with echo: true, to score the prompt")
        if value == 0 and info.data.get("min_tokens"):
            raise ValueError("max_tokens=0 generates nothing, so min_tokens must be 0")
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and value != info.data.get("n", 1):
            raise ValueError("best_of is not supported by this server beyond its default, n")
        return value

    @property
    def scores_only(self) -> bool:
        """Whether the prompt is only echoed with its logprobs (``echo`` with ``max_tokens`` 0)."""
        return self.echo and self.max_tokens == 0

    @property
    def num_prompt_logprobs(self) -> int | None:
        """The prompt's logprobs to compute: ``prompt_logprobs``'s, else, echoed, ``logprobs``'s
        (vLLM's rule: where both are given, ``prompt_logprobs`` sets the echoed ones too)."""
        if self.prompt_logprobs is not None:
            return self.prompt_logprobs
        return self.logprobs if self.echo else None


class TextContent(_Request):
    type: Literal["text"]
    text: str


class FunctionDefinition(_Request):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    """OpenAI's rule: letters, digits, underscores and dashes, at most 64."""
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, validate_default=True)
    """A JSON schema of the arguments object (its "type" is "object" where it names none); left
    out, the function takes none."""
    strict: bool | None = None
    """Accepted; calls the server holds to JSON (tool_choice "required" or named) fit the schema
    unless max_tokens or a stop string cuts them short."""

    @field_validator("parameters")
    @classmethod
    def _an_object(cls, schema: dict[str, Any] | None) -> dict[str, Any]:
        # Arguments are a JSON object in OpenAI's API; templates read the schema whatever it is.
        if schema is None:
            return dict(NO_PARAMETERS)
        if schema.get("type", "object") != "object":
            raise ValueError(f'must be the schema of an object (its "type" is {schema["type"]!r})')
        return {"type": "object", **schema}


class ChatTool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Request):
    name: str


class NamedToolChoice(_Request):
    """A ``tool_choice`` that makes the reply one call of this function."""

    type: Literal["function"]
    function: FunctionName


class FunctionCall(_Request):
    name: str
    arguments: str
    """The arguments object as JSON text, as OpenAI sends it."""


class ToolCall(_Request):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class PastToolCall(ToolCall):
    """A call in a conversation's history, as a client sends it back."""

    index: int | None = None
    """A stream's field, which clients that join its chunks keep; not used."""


class ToolCallDelta(ToolCall):
    """A call in a stream: each is sent whole, in one chunk."""

    index: int


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    """``developer`` is OpenAI's newer name for ``system``, and is rendered as one."""
    tool_calls: list[PastToolCall] | None = None
    """An assistant's calls, as a reply gave them; the template gets each one's arguments as an object."""
    content: str | list[TextContent] | None = Field(None, validate_default=True)
    """Required, except in an assistant message with tool_calls."""
    name: str | None = None
    tool_call_id: str | None = None
    """The call a ``tool`` message answers; passed to the chat template."""
    # Fields of an assistant message as OpenAI returns it, so that a client can send its
    # history back as it came (with them null or empty).
    refusal: Any = _unsupported()
    function_call: Any = _unsupported()
    audio: Any = _unsupported()
    annotations: Any = _unsupported([])

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content: Any) -> Any:
        # Named here: pydantic's own error would list the union's branches in its path.
        if isinstance(content, list):
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise ValueError(f"a content part of type {kind!r}: this server takes text parts only")
        return content

    @field_validator("tool_calls")
    @classmethod
    def _calls_of_an_assistant(
        cls, calls: list[PastToolCall] | None, info: ValidationInfo
    ) -> list[PastToolCall] | None:
        if calls and info.data.get("role") != "assistant":
            raise ValueError(f"tool_calls belong to assistant messages, not {info.data.get('role')} ones")
        for i, call in enumerate(calls or ()):
            try:
                tool_call_arguments(call.function.arguments)
            except ValueError as e:
                raise ValueError(f"[{i}].function.arguments {e}") from None
        return calls

    @field_validator("content")
    @classmethod
    def _content_unless_calls(cls, content: Any, info: ValidationInfo) -> Any:
        # Where tool_calls failed its own check, that error says all.
        if content is None and "tool_calls" in info.data and not info.data["tool_calls"]:
            raise ValueError("content is required, unless an assistant message has tool_calls")
        return content

    @property
    def text(self) -> str:
        """The content as one string: text parts one per line, as vLLM joins them."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)

    def for_template(self) -> dict[str, Any]:
        """The message as a chat template reads it; ``developer`` becomes ``system``, which templates know."""
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text}
        for field in ("name", "tool_call_id"):
            if getattr(self, field) is not None:
                message[field] = getattr(self, field)
        if self.tool_calls:
            # Templates (Llama 3.1's, transformers' convention) write the arguments with tojson.
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": tool_call_arguments(call.function.arguments)},
                }
                for call in self.tool_calls
            ]
        return message


class ChatTemplateOptions(_Request):
    """How a conversation is rendered: vLLM's options of a chat request."""

    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    """End the prompt with the header of the assistant's reply."""
    continue_final_message: bool = False
    """Leave the last message open for the model to continue; excludes add_generation_prompt."""
    chat_template_kwargs: dict[str, Any] | None = None
    """Variables for the chat template; they may set the two options above too, and win."""
    tools: list[ChatTool] | None = Field(None, max_length=128)
    """Functions the model may call, rendered by the chat template (OpenAI's limit: 128)."""
    _tools_as_sent: list[Any] | None = PrivateAttr(None)

    @model_validator(mode="wrap")
    @classmethod
    def _keep_the_tools_as_sent(cls, data: Any, handler: ModelWrapValidatorHandler[Any]) -> Any:
        # The template renders the tools as the client wrote them (key order, nulls, a schema
        # without "type"), as transformers' apply_chat_template and LLM.chat do; the validated
        # ones, their schemas completed, build the constraint of the calls the server holds to.
        request = handler(data)
        if isinstance(data, dict):
            request._tools_as_sent = data.get("tools")
        return request

    @field_validator("chat_template_kwargs")
    @classmethod
    def _variables_only(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        # The two options above may be set here too (vLLM's); any other argument of the
        # rendering (chat_template: a client's own template) may not.
        arguments = chat_template_arguments() - {"add_generation_prompt", "continue_final_message"}
        taken = sorted(arguments.intersection(value or {}))
        if taken:
            raise ValueError(f"{taken} are not template variables, and may not be set here")
        return value

    @field_validator("tools")
    @classmethod
    def _distinct_names(cls, tools: list[ChatTool] | None) -> list[ChatTool] | None:
        names = [tool.function.name for tool in tools or ()]
        if len(set(names)) < len(names):
            raise ValueError("two functions have one name")
        return tools

    def template_options(self) -> dict[str, Any]:
        """``render_chat``'s keyword arguments."""
        tools = {"tools": self._tools_as_sent} if self.tools else {}
        return {
            "add_generation_prompt": self.add_generation_prompt,
            "continue_final_message": self.continue_final_message,
            **tools,
            **(self.chat_template_kwargs or {}),
        }


class ChatCompletionRequest(_SamplingRequest, ChatTemplateOptions):
    """``POST /v1/chat/completions``."""

    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    """OpenAI's newer name for max_tokens; wins when both are set."""
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    """Whether the reply calls tools: "auto" (the default with tools) lets the model choose,
    "required" makes it call one or more, a named function makes it call that one, "none" calls none."""
    parallel_tool_calls: bool = True
    """Whether a reply may call more than one tool; false keeps the first call of an "auto" reply."""
    functions: Any = _unsupported([])
    function_call: Any = _unsupported("none")
    store: Any = _unsupported(False)
    service_tier: Any = _unsupported("auto", "default")
    modalities: Any = _unsupported(["text"])

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs to be true")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _among_tools(cls, choice: str | NamedToolChoice | None, info: ValidationInfo) -> str | NamedToolChoice | None:
        tools = info.data.get("tools")
        if choice in (None, "none", "auto"):
            return choice
        if not tools:
            raise ValueError(f"tool_choice {choice if isinstance(choice, str) else 'of a function'} needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in {t.function.name for t in tools}:
            raise ValueError(f"function {choice.function.name!r} is not among the tools")
        response_format = info.data.get("response_format")
        held = None if response_format is None else response_format.structured_outputs()
        if info.data.get("structured_outputs") is not None or held is not None:
            raise ValueError("a tool choice of required or a function excludes structured_outputs and response_format")
        return choice

    @property
    def tool_choice_kind(self) -> Literal["none", "auto", "required", "named"]:
        """The tool choice in effect: "auto" where tools come without one, "none" without tools."""
        if not self.tools:
            return "none"
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or "auto"


class TGIGrammar(_Request):
    """TGI's ``parameters.grammar``: JSON of a schema, or text of a regex."""

    type: Literal["json", "regex"]
    value: dict[str, Any] | str

    @model_validator(mode="after")
    def _value_of_its_type(self) -> TGIGrammar:
        self.structured_outputs()  # raises for a regex that is no string, JSON text that is no object
        return self

    def structured_outputs(self) -> StructuredOutputsParams:
        if self.type == "json":
            return StructuredOutputsParams(json=self.value)
        if not isinstance(self.value, str):
            raise ValueError("a regex grammar's value must be a string")
        return StructuredOutputsParams(regex=self.value)


class TGIParameters(_Request):
    """The ``parameters`` of a Text Generation Inference request, as SageMaker LLM users send it."""

    max_new_tokens: int | None = Field(None, ge=1)
    do_sample: bool = False
    """Sample instead of greedy decoding; implied by a temperature other than 1, a top_p below 1, or top_k."""
    temperature: float | None = Field(None, gt=0, le=100)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, gt=0)
    repetition_penalty: float | None = Field(None, ge=REPETITION_PENALTY_RANGE[0], le=REPETITION_PENALTY_RANGE[1])
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    stop: StopStrings = []
    seed: int | None = Field(None, ge=MIN_SEED, le=MAX_SEED)
    return_full_text: bool = False
    details: bool = False
    best_of: Any = _unsupported(1)
    watermark: Any = _unsupported(False)
    decoder_input_details: Any = _unsupported(False)
    top_n_tokens: Any = _unsupported(0)
    typical_p: Any = _unsupported()
    truncate: int | None = Field(None, ge=1)
    """Keep only the last this many tokens of the inputs."""
    grammar: TGIGrammar | None = None
    adapter_id: Any = _unsupported()


class TGIRequest(_Request):
    """A TGI-style ``POST /invocations`` body: ``{"inputs": "...", "parameters": {...}}``."""

    inputs: str
    parameters: TGIParameters = Field(default_factory=TGIParameters)
    stream: bool = False
    """TGI's token stream is not served; stream with an OpenAI-style body instead."""

    @field_validator("stream")
    @classmethod
    def _not_streamed(cls, value: bool) -> bool:
        if value:
            raise ValueError("TGI-style bodies are answered whole; to stream, send an OpenAI-style body with stream")
        return value


INVOCATION_KINDS = ("tgi", "chat", "completion")
"""The shapes of a ``POST /invocations`` body, the tags of its union."""


def _invocation_kind(body: Any) -> str | None:
    if not isinstance(body, dict):
        return None
    if "inputs" in body:
        return "tgi"
    return "chat" if "messages" in body else "completion"


InvocationRequest = Annotated[
    Annotated[TGIRequest, Tag("tgi")]
    | Annotated[ChatCompletionRequest, Tag("chat")]
    | Annotated[CompletionRequest, Tag("completion")],
    Discriminator(
        _invocation_kind,
        custom_error_type="invalid_body",
        custom_error_message="the body must be a JSON object: a completion (prompt), chat (messages) "
        "or TGI (inputs) request",
    ),
]
"""``POST /invocations``: TGI-style when it has ``inputs``, chat when ``messages``, else completion."""


class TokenizeCompletionRequest(_Request):
    """vLLM's ``POST /tokenize`` of a text."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    """Add what the tokenizer adds to a text (a BOS), as a completion's prompt gets."""
    return_token_strs: bool = False


class TokenizeChatRequest(ChatTemplateOptions):
    """vLLM's ``POST /tokenize`` of a conversation, as a chat completion renders it."""

    model: str | None = None
    add_special_tokens: bool = False
    """The chat template writes any BOS itself."""
    return_token_strs: bool = False


TokenizeRequest = Annotated[
    Annotated[TokenizeChatRequest, Tag("chat")] | Annotated[TokenizeCompletionRequest, Tag("completion")],
    Discriminator(
        lambda body: ("chat" if "messages" in body else "completion") if isinstance(body, dict) else None,
        custom_error_type="invalid_body",
        custom_error_message="the body must be a JSON object with a prompt or messages",
    ),
]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None
    """Each token's string in the vocabulary, with ``return_token_strs``."""


class DetokenizeRequest(_Request):
    """vLLM's ``POST /detokenize``."""

    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


class DetokenizeResponse(BaseModel):
    prompt: str


class PromptTokensDetails(BaseModel):
    cached_tokens: int
    """Prompt tokens whose keys and values came from the prefix cache (whole blocks)."""


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
    """As OpenAI's usage."""

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> UsageInfo:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=None if cached_tokens is None else PromptTokensDetails(cached_tokens=cached_tokens),
        )


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class PromptLogprob(BaseModel):
    """vLLM's form of one logprob in ``prompt_logprobs``."""

    logprob: float
    rank: int | None
    decoded_token: str


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    """vLLM's: the stop string or stop token id that ended the choice; None for EOS, a length
    limit, or while it runs."""
    prompt_token_ids: list[int] | None = None
    """With return_token_ids: the choice's prompt (in a stream, in the choice's first chunk)."""
    token_ids: list[int] | None = None
    """With return_token_ids: the tokens of ``text`` past any echoed prompt."""
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None
    """With prompt_logprobs: per prompt token (None for the first), token id -> its logprob."""


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    """Always set in a full response; in a stream, on the last chunk with include_usage, and on
    every chunk (its choice's tokens so far) with continuous_usage_stats too."""


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    """None where the reply is tool calls."""
    tool_calls: list[ToolCall] = []


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    """vLLM's: the stop string or stop token id that ended the choice; None for EOS, a length
    limit, or while it runs."""
    token_ids: list[int] | None = None
    """With return_token_ids."""


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_token_ids: list[int] | None = None
    """With return_token_ids: the rendered conversation's tokens."""
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None
    """With prompt_logprobs, as in a completion choice."""


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    """vLLM's: the stop string or stop token id that ended the choice; None for EOS, a length
    limit, or while it runs."""
    token_ids: list[int] | None = None
    """With return_token_ids: this chunk's tokens."""


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None
    prompt_token_ids: list[int] | None = None
    """With return_token_ids, in the first chunk."""


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "neuron-llm"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TGIDetails(BaseModel):
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    generated_tokens: int
    seed: int | None = None


class TGIGeneration(BaseModel):
    generated_text: str
    details: TGIDetails | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail

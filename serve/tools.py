"""Tool calls in chat replies: held to JSON of the request's functions, or read from the model's text.

With ``tool_choice`` "required" or a named function, a structured output holds the reply to
JSON of the calls, so any model answers with calls, as in vLLM: a named function's reply is
its arguments object, a required one's a list of ``{"name", "parameters"}`` objects. With
"auto" the model chooses, and the server's tool-call parser reads the calls from its text:
``llama3_json`` reads the JSON calls of Llama 3.1-3.3 (``{"name": ..., "parameters": {...}}``,
several joined by ";", after an optional ``<|python_tag|>``); a reply that is not such JSON,
or calls a function the request did not offer, is the message's content.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from neuron_llm.loader.tokenizer import NO_PARAMETERS
from neuron_llm.sampling_params import StructuredOutputsParams
from neuron_llm.serve.protocol import ChatCompletionRequest, ChatTool, FunctionCall, ToolCall

TOOL_CALL_PARSERS = ("llama3_json",)
"""The ways the server can read tool calls from a reply (``--tool-call-parser``)."""

_PYTHON_TAG = "<|python_tag|>"
_COMPACT = {"x-guidance": {"whitespace_flexible": False}}
"""Held calls are compact JSON: fewer tokens, and no run of whitespace a model could loop in."""


@dataclass(frozen=True)
class ToolCalling:
    """How one request's reply becomes tool calls."""

    kind: str
    """"auto", "required" or "named" (``ChatCompletionRequest.tool_choice_kind``)."""
    tools: list[ChatTool]
    name: str | None = None
    """The function of a named tool choice."""
    parallel: bool = True

    @classmethod
    def of(cls, body: ChatCompletionRequest) -> ToolCalling | None:
        """The request's tool calling; None when its reply is plain content."""
        kind = body.tool_choice_kind
        if kind == "none":
            return None
        name = body.tool_choice.function.name if kind == "named" else None  # type: ignore[union-attr]
        return cls(kind, list(body.tools or ()), name, body.parallel_tool_calls)

    def structure(self) -> StructuredOutputsParams:
        """The JSON a reply of held calls ("required" or named) is held to."""
        if self.kind == "named":
            return StructuredOutputsParams(
                json={**_COMPACT, **_held_parameters(self._tool(self.name).function.parameters)}
            )
        calls = []
        for index, tool in enumerate(self.tools):
            # Each function's schema moves below the root, and so must the places its local
            # references point to ("#/$defs/...", draft 7's "#/definitions/...", "#").
            parameters = _rebased(
                _held_parameters(tool.function.parameters), f"#/items/anyOf/{index}/properties/parameters"
            )
            calls.append(
                {
                    "type": "object",
                    "properties": {"name": {"type": "string", "enum": [tool.function.name]}, "parameters": parameters},
                    "required": ["name", "parameters"],
                    "additionalProperties": False,
                }
            )
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}, **_COMPACT}
        if not self.parallel:
            schema["maxItems"] = 1
        return StructuredOutputsParams(json=schema)

    def calls(self, text: str) -> list[ToolCall] | None:
        """The calls of a finished reply; None when it holds none, and is content."""
        if self.kind == "named":
            # Cut short by max_tokens (or a stop string), the arguments are cut too, as in vLLM.
            return [_call(self.name, text)]  # type: ignore[arg-type]
        if self.kind == "required":
            try:
                items = json.loads(text)
            except (ValueError, RecursionError):
                # Cut short by max_tokens or a stop string; or an integer past Python's 4,300
                # digits, which its parser refuses with a ValueError of its own.
                return None
            return [_call(item["name"], _json(item["parameters"])) for item in items]  # as the schema holds
        parsed = parse_llama3_json(text)
        if parsed is None:
            return None
        parsed = parsed[: None if self.parallel else 1]
        offered = {tool.function.name for tool in self.tools}
        if any(name not in offered for name, _ in parsed):
            return None  # a call of a function the request did not offer: the model's own JSON
        return [_call(name, arguments) for name, arguments in parsed]

    def may_be_calls(self, text: str) -> bool | None:
        """Whether a reply beginning with ``text`` may be calls (it is then held back until it
        ends); None while only whitespace has come."""
        if self.kind != "auto":
            return True
        start = text.lstrip()
        if not start:
            return None
        return start.startswith(("{", _PYTHON_TAG)) or _PYTHON_TAG.startswith(start)

    def finish_reason(self, reason: str | None, calls: list[ToolCall] | None) -> str | None:
        """OpenAI's "tool_calls" where the model chose to call; a named function's call ends as it ended."""
        if calls and self.kind != "named" and reason == "stop":
            return "tool_calls"
        return reason

    def _tool(self, name: str | None) -> ChatTool:
        return next(tool for tool in self.tools if tool.function.name == name)


def _held_parameters(parameters: dict[str, Any] | None) -> dict[str, Any]:
    """The schema a call's arguments are held to. A function declared without parameters takes
    none (OpenAI: "an empty parameter list"), so its arguments are ``{}``: the schema templates
    read for it, ``{"type": "object", "properties": {}}``, would allow any object."""
    parameters = dict(parameters or {})
    if parameters == NO_PARAMETERS:
        parameters["additionalProperties"] = False
    return parameters


_VALUE_KEYWORDS = frozenset({"const", "enum", "default", "examples"})
"""Keywords whose values are JSON data, not schemas: a "$ref" in them is no reference."""
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "dependentSchemas", "$defs", "definitions"})
"""Keywords whose values map names (any names, "default" too) to schemas."""


def _rebased(schema: Any, root: str) -> Any:
    """``schema`` with its JSON-pointer references ("#" and "#/...") made to point below ``root``;
    others (anchors, other documents) are left as they are."""
    if isinstance(schema, list):
        return [_rebased(item, root) for item in schema]
    if not isinstance(schema, dict):
        return schema
    rebased = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and (value == "#" or value.startswith("#/")):
            rebased[key] = root + value[1:]
        elif key in _VALUE_KEYWORDS:
            rebased[key] = value
        elif key in _SCHEMA_MAPS and isinstance(value, dict):
            rebased[key] = {name: _rebased(subschema, root) for name, subschema in value.items()}
        else:
            rebased[key] = _rebased(value, root)
    return rebased


def parse_llama3_json(text: str) -> list[tuple[str, str]] | None:
    """The ``(name, arguments JSON)`` calls of a Llama 3 JSON tool-call reply; None unless the
    whole reply is such calls."""
    text = text.strip().removeprefix(_PYTHON_TAG).strip()
    decoder = json.JSONDecoder()
    calls = []
    position = 0
    while True:
        try:
            call, position = decoder.raw_decode(text, position)
        except (ValueError, RecursionError):  # not JSON, or an integer past 4,300 digits
            return None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return None
        # Llama 3.1's templates say "parameters"; some fine-tunes write "arguments".
        arguments = call.get("parameters", call.get("arguments"))
        if not isinstance(arguments, dict):
            return None
        calls.append((call["name"], _json(arguments)))
        rest = text[position:].lstrip()
        if rest.startswith(";"):
            rest = rest[1:].lstrip()
        elif rest:
            return None
        if not rest:
            return calls
        position = len(text) - len(rest)


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _call(name: str, arguments: str) -> ToolCall:
    return ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", function=FunctionCall(name=name, arguments=arguments))

"""Tool calls in chat replies: held to JSON of the request's functions, or read from the model's text.

With ``tool_choice`` "required" or a named function, a structured output holds the reply to
JSON of the calls, so any model answers with calls, as in vLLM: a named function's reply is
its arguments object, a required one's a list of ``{"name", "parameters"}`` objects. With
"auto" the model chooses, and the server's tool-call parser reads the calls from its text:
``llama3_json`` reads the JSON calls of Llama 3.1-3.3 (``{"name": ..., "parameters": {...}}``,
several joined by ";", after an optional ``<|python_tag|>``); a reply that is not such JSON
is the message's content.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

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

    def structure(self) -> StructuredOutputsParams | None:
        """The JSON the reply is held to; None for "auto"."""
        if self.kind == "named":
            return StructuredOutputsParams(json={**_parameters(self._tool(self.name)), **_COMPACT})
        if self.kind == "required":
            call = [
                {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "enum": [tool.function.name]},
                        "parameters": _parameters(tool),
                    },
                    "required": ["name", "parameters"],
                    "additionalProperties": False,
                }
                for tool in self.tools
            ]
            schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": call}, **_COMPACT}
            if not self.parallel:
                schema["maxItems"] = 1
            return StructuredOutputsParams(json=schema)
        return None

    def calls(self, text: str) -> list[ToolCall] | None:
        """The calls of a finished reply; None when it holds none, and is content."""
        if self.kind == "named":
            # Cut short by max_tokens, the arguments are cut too, as the client can see.
            return [_call(self.name, text)]  # type: ignore[arg-type]
        if self.kind == "required":
            try:
                items = json.loads(text)
            except json.JSONDecodeError:
                return None  # cut short by max_tokens
            return [_call(item["name"], json.dumps(item["parameters"])) for item in items]  # as the schema holds
        parsed = parse_llama3_json(text)
        return None if parsed is None else [_call(name, arguments) for name, arguments in parsed]

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
        except json.JSONDecodeError:
            return None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return None
        # Llama 3.1's templates say "parameters"; some fine-tunes write "arguments".
        arguments = call.get("parameters", call.get("arguments"))
        if not isinstance(arguments, dict):
            return None
        calls.append((call["name"], json.dumps(arguments)))
        rest = text[position:].lstrip()
        if not rest:
            return calls
        if not rest.startswith(";"):
            return None
        position = len(text) - len(rest[1:].lstrip())


def _parameters(tool: ChatTool) -> dict[str, Any]:
    """The schema of a function's arguments: an object, of no properties where it declares none."""
    if tool.function.parameters is not None:
        return tool.function.parameters
    return {"type": "object", "properties": {}, "additionalProperties": False}


def _call(name: str, arguments: str) -> ToolCall:
    return ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", function=FunctionCall(name=name, arguments=arguments))

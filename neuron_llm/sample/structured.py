"""Structured outputs: each sequence's tokens held to a JSON schema, a regex, a choice or a grammar.

A request's ``StructuredOutputsParams`` compile (llguidance, as vLLM's "guidance" backend)
into a grammar matcher per sequence. Before each step the matcher gives the tokens that
may come next, which the sampler adds to the row's bias as -inf elsewhere; after it, the
matcher takes the token drawn. The sequence ends ("stop") on the token that completes the
grammar: it would allow nothing but EOS after it.
"""

from __future__ import annotations

import collections
import json
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from neuron_llm.sampling_params import StructuredOutputsParams


def _llguidance() -> Any:
    try:
        import llguidance
        import llguidance.hf
    except ImportError as e:
        raise ImportError(
            "structured outputs need llguidance (pip install 'neuron-llm[structured]', which the serve extra has)"
        ) from e
    return llguidance


class GrammarError(ValueError):
    """An invalid schema, regex or grammar, or one that gave out partway (a limit met, or a
    token it refuses drawn from a row whose allowed tokens were all banned):
    ``structured_outputs.{field}: {reason}``."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"structured_outputs.{field}: {reason}")
        self.reason = reason


class GrammarCompiler:
    """Turns ``StructuredOutputsParams`` into matchers over one tokenizer's vocabulary.

    Safe to share between threads: the server compiles a request's grammar (``compile``) off
    the engine's thread before queueing it, and the engine then starts each of the request's
    sequences from a copy of it (``matcher``), which costs next to nothing. The tokenizer's
    llguidance form is built at the first request that needs it: about a second for a large
    vocabulary, which a model never asked for structure never pays.
    """

    _CACHED_GRAMMARS = 64

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        # llguidance refuses EOS ids past the tokenizer's own (a model's padding rows).
        self._eos_token_ids = sorted(i for i in eos_token_ids if i < len(tokenizer))
        self._ll_tokenizer: Any = None
        self._compiled: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._lock = threading.Lock()

    def compile(self, params: StructuredOutputsParams) -> Any:
        """``params``' grammar compiled against the vocabulary (cached by its text);
        ``ValueError`` naming the field when the schema, regex or grammar is invalid."""
        llguidance = _llguidance()
        field, grammar = _grammar(llguidance.LLMatcher, params)
        with self._lock:
            compiled = self._compiled.get(grammar)
            if compiled is not None:
                self._compiled.move_to_end(grammar)
                return compiled
            if self._ll_tokenizer is None:
                # Its size covers the model's rows and the tokenizer's tokens, whichever are more:
                # the masks are cut or padded (never allowed) to the model's rows.
                self._ll_tokenizer = llguidance.hf.from_tokenizer(
                    self._tokenizer,
                    n_vocab=max(self._vocab_size, len(self._tokenizer)),
                    eos_token=self._eos_token_ids or None,
                )
            ll_tokenizer = self._ll_tokenizer
        compiled = llguidance.LLMatcher(ll_tokenizer, grammar, log_level=0)  # without the lock: may take long
        if compiled.is_error():
            raise GrammarError(field, _one_line(compiled.get_error()))
        # Some grammars fail only once a mask is asked for: one that no text can match, or one
        # past llguidance's limits (a regex of a{1000000}).
        probe = compiled.deep_copy()
        probe.compute_bitmask()
        if probe.is_error():
            raise GrammarError(field, f"fails before its first token: {_one_line(probe.get_error())}")
        with self._lock:
            self._compiled[grammar] = compiled
            if len(self._compiled) > self._CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
        return compiled

    def matcher(self, params: StructuredOutputsParams) -> Grammar:
        """A new matcher at the start of ``params``' grammar (``compile``'s errors)."""
        return Grammar(self.compile(params).deep_copy(), self._vocab_size, _field(params))


class Grammar:
    """One sequence's place in its grammar."""

    def __init__(self, matcher: Any, vocab_size: int, field: str) -> None:
        self._matcher = matcher
        self._vocab_size = vocab_size
        self._field = field

    def allowed(self) -> np.ndarray:
        """bool [vocab_size]: the tokens that may come next (only EOS once the grammar is complete)."""
        bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        return np.unpackbits(bits, bitorder="little")[: self._vocab_size].astype(bool)

    @property
    def field(self) -> str:
        """The ``StructuredOutputsParams`` field that set the grammar (its errors name it)."""
        return self._field

    @property
    def is_complete(self) -> bool:
        """Whether the grammar allows nothing more (but EOS): the text is whole."""
        return bool(self._matcher.is_stopped()) and not self._matcher.is_error()

    def accept(self, token_id: int) -> None:
        """Advance past ``token_id``. ``GrammarError`` when llguidance gave up on the grammar
        partway (a limit met: a regex of a{1000000}; its last mask then allowed only EOS), or
        when the token may not come here (the engine fails a row whose mask the request's other
        constraints empty before its token is drawn)."""
        if (failure := self.failure()) is not None:
            raise failure
        if not self._matcher.consume_token(token_id):
            raise GrammarError(self._field, f"token {token_id} may not come where it was sampled ({self._error()})")

    def failure(self) -> GrammarError | None:
        """The error llguidance gave up on the grammar with, partway; None while it holds."""
        return GrammarError(self._field, f"failed partway: {self._error()}") if self._matcher.is_error() else None

    def _error(self) -> str:
        return _one_line(self._matcher.get_error())


def _grammar(llmatcher: Any, params: StructuredOutputsParams) -> tuple[str, str]:
    """The field ``params`` sets and its llguidance grammar."""
    field = _field(params)
    if field == "json":
        schema = json.loads(params.json) if isinstance(params.json, str) else params.json
        if params.disable_additional_properties:
            schema = _closed(schema)
        return field, llmatcher.grammar_from_json_schema(schema)
    if field == "json_object":
        return field, llmatcher.grammar_from_json_schema({"type": "object"})
    if field == "regex":
        return field, llmatcher.grammar_from_regex(params.regex)
    if field == "choice":
        # Lark string literals take JSON's escapes.
        return field, llmatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in params.choice))
    return field, llmatcher.grammar_from_lark(params.grammar)


_SUBSCHEMA = ("additionalProperties", "items", "contains", "propertyNames", "not", "if", "then", "else")
_SUBSCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems", "items")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def _closed(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` on each object schema that does not set it.

    Only keywords that hold schemas are walked, so a value of ``const``, ``enum`` or
    ``default`` stays as written.
    """
    if not isinstance(schema, dict):
        return schema  # a boolean schema
    closed = dict(schema)
    for key in _SUBSCHEMA:
        if isinstance(schema.get(key), dict):
            closed[key] = _closed(schema[key])
    for key in _SUBSCHEMA_LISTS:
        if isinstance(schema.get(key), list):
            closed[key] = [_closed(item) for item in schema[key]]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            closed[key] = {name: _closed(item) for name, item in schema[key].items()}
    types = schema.get("type")
    is_object = types == "object" or (isinstance(types, list) and "object" in types) or "properties" in schema
    if is_object and "additionalProperties" not in schema:
        closed["additionalProperties"] = False
    return closed


def _field(params: StructuredOutputsParams) -> str:
    """The field ``params`` sets (exactly one is)."""
    given = (name for name in ("json", "regex", "choice", "grammar") if getattr(params, name) is not None)
    return next(given, "json_object")


def _one_line(message: str) -> str:
    """llguidance's message in one line: its first, and the parser's "error:" line, without the
    source excerpt and caret drawn under them."""
    lines = [line.strip() for line in message.strip().splitlines()]
    return " ".join(lines[:1] + [line for line in lines[1:] if line.startswith("error:")])

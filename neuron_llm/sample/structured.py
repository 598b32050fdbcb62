"""Structured outputs: each sequence's tokens held to a JSON schema, a regex, a choice or a grammar.

A request's ``StructuredOutputsParams`` compile (llguidance, as vLLM's "guidance" backend)
into a grammar matcher per sequence. Before each step the matcher gives the tokens that
may come next, which the sampler adds to the row's bias as -inf elsewhere; after it, the
matcher takes the token drawn. When the grammar is complete it allows only EOS, so the
sequence ends as any other does, on EOS.
"""

from __future__ import annotations

import json
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


class GrammarCompiler:
    """Turns ``StructuredOutputsParams`` into matchers over one tokenizer's vocabulary.

    The tokenizer's llguidance form is built at the first request that needs it: it takes
    about a second for a large vocabulary, which a model never asked for structure never pays.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._eos_token_ids = sorted(eos_token_ids)
        self._ll_tokenizer: Any = None

    def matcher(self, params: StructuredOutputsParams) -> Grammar:
        """A new matcher at the start of ``params``' grammar; ``ValueError`` naming the field
        when the schema, regex or grammar is invalid."""
        llguidance = _llguidance()
        if self._ll_tokenizer is None:
            # n_vocab is the model's: rows past the tokenizer's (padding) are never allowed.
            self._ll_tokenizer = llguidance.hf.from_tokenizer(
                self._tokenizer, n_vocab=self._vocab_size, eos_token=self._eos_token_ids or None
            )
        field, grammar = _grammar(llguidance.LLMatcher, params)
        matcher = llguidance.LLMatcher(self._ll_tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"structured_outputs.{field}: {_one_line(matcher.get_error())}")
        return Grammar(matcher, self._vocab_size)


def grammar_error(params: StructuredOutputsParams) -> str | None:
    """Why ``params``' schema, regex or grammar is invalid, in one line; None when it is valid.
    Needs no tokenizer: the server checks a request with it before queueing it."""
    llmatcher = _llguidance().LLMatcher
    error = llmatcher.validate_grammar(_grammar(llmatcher, params)[1])
    return _one_line(error) if error else None


class Grammar:
    """One sequence's place in its grammar."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self._matcher = matcher
        self._vocab_size = vocab_size

    def allowed(self) -> np.ndarray:
        """bool [vocab_size]: the tokens that may come next (only EOS once the grammar is complete)."""
        bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        return np.unpackbits(bits, bitorder="little")[: self._vocab_size].astype(bool)

    def accept(self, token_id: int) -> bool:
        """Advance past ``token_id``; False (and the grammar is broken for good) when it may
        not come here, which a row with every allowed token banned can force."""
        return bool(self._matcher.consume_token(token_id))

    @property
    def error(self) -> str:
        return _one_line(self._matcher.get_error())


def _grammar(llmatcher: Any, params: StructuredOutputsParams) -> tuple[str, str]:
    """The field ``params`` sets and its llguidance grammar."""
    if params.json is not None:
        schema = json.loads(params.json) if isinstance(params.json, str) else params.json
        return "json", llmatcher.grammar_from_json_schema(schema)
    if params.json_object:
        return "json_object", llmatcher.grammar_from_json_schema({"type": "object"})
    if params.regex is not None:
        return "regex", llmatcher.grammar_from_regex(params.regex)
    if params.choice is not None:
        # Lark string literals take JSON's escapes.
        return "choice", llmatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in params.choice))
    assert params.grammar is not None
    return "grammar", llmatcher.grammar_from_lark(params.grammar)


def _one_line(message: str) -> str:
    """llguidance's message in one line: its first, and the parser's "error:" line, without the
    source excerpt and caret drawn under them."""
    lines = [line.strip() for line in message.strip().splitlines()]
    return " ".join(lines[:1] + [line for line in lines[1:] if line.startswith("error:")])

"""Structured outputs: each grammar's masks, followed token by token, spell only what it allows."""

from __future__ import annotations

import json
import random
import re

import pytest
from transformers import PreTrainedTokenizerBase

from neuron_llm.sampling_params import StructuredOutputsParams
from tests.conftest import BOUNDED_JSON_SCHEMA, fits_bounded_schema
from tests.tokenizer_kinds import byte_level_bpe

structured = pytest.importorskip("neuron_llm.sample.structured")
pytest.importorskip("llguidance")


def _walk(tokenizer: PreTrainedTokenizerBase, params: StructuredOutputsParams, seed: int) -> str:
    """The text of a random path through the grammar: any allowed token each step, until EOS."""
    eos = tokenizer.eos_token_id
    grammar = structured.GrammarCompiler(tokenizer, len(tokenizer), [eos]).matcher(params)
    rng, tokens = random.Random(seed), []
    for _ in range(64):
        allowed = grammar.allowed().nonzero()[0].tolist()
        assert allowed, "a grammar always allows some token"
        token = rng.choice(allowed)
        grammar.accept(token)
        if token == eos:
            return tokenizer.decode(tokens)
        tokens.append(token)
    raise AssertionError(f"no EOS after 64 tokens: {tokenizer.decode(tokens)!r}")


@pytest.mark.parametrize("seed", range(4))
def test_every_path_spells_what_the_grammar_allows(tokenizer: PreTrainedTokenizerBase, seed: int) -> None:
    assert re.fullmatch(r"[0-9]{3}", _walk(tokenizer, StructuredOutputsParams(regex="[0-9]{3}"), seed))
    choices = ["the fox", "hello world", "café"]
    assert _walk(tokenizer, StructuredOutputsParams(choice=choices), seed) in choices
    assert fits_bounded_schema(json.loads(_walk(tokenizer, StructuredOutputsParams(json=BOUNDED_JSON_SCHEMA), seed)))
    assert isinstance(
        json.loads(_walk(tokenizer, StructuredOutputsParams(json=json.dumps(BOUNDED_JSON_SCHEMA)), seed)), dict
    )
    lark = 'start: "say " WORD\nWORD: /[a-z]{2,4}/'
    assert re.fullmatch(r"say [a-z]{2,4}", _walk(tokenizer, StructuredOutputsParams(grammar=lark), seed))


def test_rows_past_the_tokenizers_vocabulary_are_never_allowed(tokenizer: PreTrainedTokenizerBase) -> None:
    # A model's embedding may have more rows than its tokenizer has tokens (padding).
    compiler = structured.GrammarCompiler(tokenizer, len(tokenizer) + 7, [tokenizer.eos_token_id])
    mask = compiler.matcher(StructuredOutputsParams(regex="[a-z]+")).allowed()
    assert mask.shape == (len(tokenizer) + 7,) and mask.any() and not mask[len(tokenizer) :].any()


def test_a_token_outside_the_grammar_breaks_it_and_is_refused(tokenizer: PreTrainedTokenizerBase) -> None:
    grammar = structured.GrammarCompiler(tokenizer, len(tokenizer), [tokenizer.eos_token_id]).matcher(
        StructuredOutputsParams(regex="[0-9]+")
    )
    letter = tokenizer.convert_tokens_to_ids("x")
    assert not grammar.allowed()[letter]
    with pytest.raises(ValueError, match=rf"^structured_outputs\.regex: token {letter} may not come where it was"):
        grammar.accept(letter)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (StructuredOutputsParams(regex="[0-9"), r"unclosed character class"),
        (StructuredOutputsParams(json={"type": "foo"}), r"Invalid type: foo"),
        (StructuredOutputsParams(grammar="start: x"), r"unknown name"),
        # Valid text, but a token the vocabulary does not have: found only with the tokenizer.
        (StructuredOutputsParams(grammar='start: "hi" <[999999]>'), r"999999"),
        # Valid, but no text matches them: found at the first mask.
        (StructuredOutputsParams(regex=r"[^\s\S]"), r"fails before its first token"),
        (StructuredOutputsParams(json={"$ref": "#"}), r"fails before its first token"),
        (StructuredOutputsParams(grammar="start: a\na: b\nb: a"), r"fails before its first token"),
    ],
)
def test_an_invalid_grammar_is_refused_naming_its_field(
    tokenizer: PreTrainedTokenizerBase, params: StructuredOutputsParams, message: str
) -> None:
    compiler = structured.GrammarCompiler(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    with pytest.raises(ValueError, match=rf"^structured_outputs\.\w+: .*{message}"):
        compiler.matcher(params)


def test_a_grammar_compiles_once_and_each_sequence_starts_from_a_copy(tokenizer: PreTrainedTokenizerBase) -> None:
    compiler = structured.GrammarCompiler(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    params = StructuredOutputsParams(regex="[0-9]{2}")
    assert compiler.compile(params) is compiler.compile(StructuredOutputsParams(regex="[0-9]{2}"))
    first, second = compiler.matcher(params), compiler.matcher(params)
    start = second.allowed()
    for _ in range(2):
        if not first.is_complete:
            first.accept(int(first.allowed().nonzero()[0][0]))
    assert first.is_complete
    assert not second.is_complete and (second.allowed() == start).all()  # the copy went on alone


def test_a_tokenizer_larger_than_the_model_and_eos_in_padding_rows(tokenizer: PreTrainedTokenizerBase) -> None:
    # A tokenizer may know more tokens than the model has rows, and a model's EOS may be a
    # padding row the tokenizer lacks: masks are the model's size, and such an EOS is no token.
    size = len(tokenizer) - 5
    compiler = structured.GrammarCompiler(tokenizer, size, [tokenizer.eos_token_id, len(tokenizer) + 3])
    mask = compiler.matcher(StructuredOutputsParams(regex="[a-z]+")).allowed()
    assert mask.shape == (size,) and mask.any()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "set exactly one of"),
        ({"regex": "a", "choice": ["a"]}, "set exactly one of"),
        ({"json": "[1, 2"}, r"structured_outputs\.json: not JSON text"),
        ({"json": "[" * 5000 + "]" * 5000}, r"structured_outputs\.json: not JSON text"),  # too deep to parse
        ({"json": "[1, 2]"}, r"structured_outputs\.json=.*must be a JSON object"),
        ({"choice": ["a", ""]}, r"structured_outputs\.choice=.*non-empty strings"),
        ({"json_object": False}, "set exactly one of"),
        ({"regex": 5}, r"structured_outputs\.regex=5: must be a string"),
        ({"json": {}, "regex": ""}, "set exactly one of"),  # empty ones count, as in vLLM
        ({"json": {}, "disable_additional_properties": "yes"}, r"disable_additional_properties='yes': must be a bool"),
    ],
)
def test_structured_outputs_params_are_checked(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StructuredOutputsParams(**fields)


def test_an_empty_schema_or_regex_is_one_given() -> None:
    assert StructuredOutputsParams(json={}).json == {} and StructuredOutputsParams(regex="").regex == ""


def test_a_grammar_llguidance_gives_up_on_partway_fails_on_the_next_token(tokenizer: PreTrainedTokenizerBase) -> None:
    # A regex past llguidance's lexer limits compiles and gives a first mask, then fails as
    # tokens come; its masks then allow only EOS, which must not pass for a finished text.
    compiler = structured.GrammarCompiler(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    grammar = compiler.matcher(StructuredOutputsParams(regex="a{1000000}"))
    with pytest.raises(ValueError, match=r"^structured_outputs\.regex: (failed partway|token \d+ may not)"):
        for _ in range(64):
            grammar.accept(int(grammar.allowed().nonzero()[0][-1]))


def test_a_closed_schema_takes_no_property_it_does_not_name() -> None:
    schema = {
        "type": "object",
        "properties": {"a": {"type": "integer"}},
        "required": ["a"],
        "x-guidance": {"whitespace_flexible": False},
    }
    tokenizer = byte_level_bpe()
    compiler = structured.GrammarCompiler(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    comma, brace = tokenizer.convert_tokens_to_ids([",", "}"])
    for closed in (False, True):
        grammar = compiler.matcher(StructuredOutputsParams(json=schema, disable_additional_properties=closed))
        for token in tokenizer.encode('{"a":1', add_special_tokens=False):
            grammar.accept(token)
        allowed = grammar.allowed()
        assert (allowed[comma], allowed[brace]) == (not closed, True)


def test_closing_a_schema_walks_its_subschemas_only() -> None:
    point = {"type": "object", "properties": {"x": {"type": "number"}}}
    schema = {
        "type": ["object", "null"],
        "properties": {"p": point, "open": {"type": "object", "additionalProperties": True}},
        "$defs": {"point": point},
        "anyOf": [{"properties": {"q": {"type": "array", "items": point}}}],
        "const": {"type": "object"},
    }
    closed = structured._closed(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["p"]["additionalProperties"] is False
    assert closed["properties"]["open"]["additionalProperties"] is True
    assert closed["$defs"]["point"]["additionalProperties"] is False
    assert closed["anyOf"][0]["additionalProperties"] is False
    assert closed["anyOf"][0]["properties"]["q"]["items"]["additionalProperties"] is False
    assert "additionalProperties" not in closed["properties"]["p"]["properties"]["x"]
    assert closed["const"] == {"type": "object"} and "additionalProperties" not in point

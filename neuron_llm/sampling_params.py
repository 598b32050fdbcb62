"""How one request is sampled: vLLM's ``SamplingParams`` names, defaults and ranges.

Every value is checked once, in ``__post_init__``; a bad one raises ``ValueError`` naming
the field and the value, so the server can turn it into a 4xx without further checks.
"""

from __future__ import annotations

import functools
import json as json_module
import logging
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

OUTPUT_KINDS = ("cumulative", "delta", "final_only")
"""vLLM's ``RequestOutputKind``s, by name (``SamplingParams.output_kind``)."""

MAX_LOGPROBS = 20
"""Most top logprobs a request may ask for per position (vLLM's default ``max_logprobs``)."""

logger = logging.getLogger(__name__)

MAX_LOGIT_BIAS = 1024
"""Most token ids one request may bias: each step rebuilds every running request's biases."""

MAX_N = 1024
"""Most completions of one prompt: the engine builds every one's sequence when the request is
added, on its one thread; a request with millions stalled every other and then ran out of memory."""

MAX_STOP_STRINGS = 128
MAX_STOP_STRING_CHARS = 1024
"""Most stop strings one request may give, and their longest: every new token of the sequence
is matched against each, on the engine's one thread (20,000 of them made every step 20x slower)."""

MAX_STOP_TOKEN_IDS = 1024
"""Most stop token ids one request may give: every new token is looked up in them, and a
min_tokens request's are masked at each step, on the engine's one thread."""

MAX_BAD_WORDS = 128
"""Most bad_words one request may give (vLLM's limit): every step matches each against the
row's output, on the engine's one thread."""
MAX_BAD_WORD_CHARS = 1024
"""Longest bad word: the engine's one thread tokenizes them when the request is added, which
for 128 words this long takes tens of milliseconds; megabytes of them stalled every request."""

MIN_TEMPERATURE = 1e-2
"""Smaller positive temperatures are raised to this, with a warning, as vLLM does: only 0 is
greedy, and a temperature of 1e-4 samples as vLLM's 0.01 would, not as a near-argmax."""
MAX_TEMPERATURE = 1e6
"""Larger temperatures are refused: any this large already samples the allowed tokens about
uniformly, and past float32's range a banned token's -inf logit would become NaN and win."""
REPETITION_PENALTY_RANGE = (1e-6, 1e6)
"""Penalties outside it are refused: further from 1, a seen token's float32 logit overflows to
inf (or a banned one's -inf times 0 gives NaN), and the constraints no longer hold."""


def _require(condition: bool, name: str, value: Any, why: str) -> None:
    if not condition:
        raise ValueError(f"{name}={value!r}: {why}")


def is_integral(value: Any) -> bool:
    """An integer of Python or NumPy; not a bool, which is one, but n=True is a mistake, not a count."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_list_of(value: Any, is_item: Callable[[Any], Any]) -> bool:
    """Whether ``value`` is a list or tuple whose every item ``is_item``."""
    return isinstance(value, (list, tuple)) and all(is_item(item) for item in value)


def _is_token_id(value: Any) -> bool:
    return is_integral(value) and value >= 0


def is_finite_number(value: Any) -> bool:
    """A finite real number of Python or NumPy; not a bool."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


MIN_SEED, MAX_SEED = -(2**63), 2**64 - 1
"""Seeds span int64 (OpenAI) and uint64 (vLLM); each maps onto one 64-bit generator seed."""


@dataclass(frozen=True)
class StructuredOutputsParams:
    """What a sequence's text must be (vLLM's): exactly one of a JSON schema, any JSON object, a
    regex, one of several strings, or a Lark grammar. Needs llguidance (the structured extra)."""

    json: str | dict[str, Any] | None = None
    """A JSON schema, as a dict or its JSON text."""
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    """A Lark grammar (llguidance's dialect), its rule ``start`` the whole text."""
    json_object: bool | None = None
    """True: any JSON object."""
    disable_additional_properties: bool = False
    """An object of the JSON schema that does not say whether it takes properties it does not
    name takes none (``additionalProperties: false``), as in OpenAI's strict mode."""

    def __post_init__(self) -> None:
        # As in vLLM, an empty schema ({}: any JSON) or regex counts as given; json_object only when true.
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        given += ["json_object"] * bool(self.json_object)
        if len(given) != 1:
            raise ValueError(
                f"structured_outputs: set exactly one of json, regex, choice, grammar, json_object, not {given}"
            )
        if isinstance(self.json, str):
            try:
                schema = json_module.loads(self.json)
            except (ValueError, RecursionError) as e:  # RecursionError: nested too deeply
                raise ValueError(f"structured_outputs.json: not JSON text: {e}") from None
            _require(isinstance(schema, dict), "structured_outputs.json", self.json, "must be a JSON object")
        _require(
            self.json is None or isinstance(self.json, (str, dict)),
            "structured_outputs.json",
            self.json,
            "must be a JSON schema, as a dict or its text",
        )
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            _require(value is None or isinstance(value, str), f"structured_outputs.{name}", value, "must be a string")
        choice = self.choice
        _require(
            choice is None or _is_list_of(choice, lambda c: isinstance(c, str) and c),
            "structured_outputs.choice",
            choice,
            "must be a list of non-empty strings",
        )
        if choice is not None:
            object.__setattr__(self, "choice", list(choice))
        for name in ("json_object", "disable_additional_properties"):
            value = getattr(self, name)
            _require(value is None or isinstance(value, bool), f"structured_outputs.{name}", value, "must be a bool")


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings of one request; the defaults reproduce plain ancestral sampling."""

    n: int = 1
    """Completions returned for the prompt."""
    temperature: float = 1.0
    """Divides the logits before sampling; 0 is greedy (argmax); others under 0.01 are raised to it."""
    top_p: float = 1.0
    """Keep the smallest set of most likely tokens whose probability sums to at least top_p, and
    every token tied with the least likely one kept (not one of them picked by sort order); 1
    keeps all."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 or -1 keeps all (stored as 0)."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the most likely token's; 0 keeps all."""
    seed: int | None = None
    """Seeds this request's own random stream, so its random draws do not depend on the rest of
    the batch (in float32 its tokens do not either; 16-bit logits round differently with the
    batch's size); -1 is no seed, as in vLLM (stored as None)."""
    max_tokens: int | None = 16
    """Most tokens generated; None is bounded only by the model's context length."""
    min_tokens: int = 0
    """Tokens generated before EOS, stop_token_ids or stop strings may end the sequence."""
    stop: str | list[str] | None = None
    """Strings that end the sequence; the output text is cut before them. Stored as a list."""
    stop_token_ids: list[int] | None = None
    """Token ids that end the sequence, besides EOS. Stored as a list."""
    ignore_eos: bool = False
    """Keep generating after EOS (benchmarking); ``min_tokens`` still holds EOS back, as in vLLM."""
    include_stop_str_in_output: bool = False
    """Keep the stop string, EOS or stop token that ended the sequence at the end of its text."""
    skip_special_tokens: bool = True
    """Leave special tokens (a BOS, chat markers) out of the text."""
    spaces_between_special_tokens: bool = True
    """vLLM's, taken for its callers: it steers slow tokenizers only, and the fast ones this
    engine runs put no space between special tokens either way."""
    detokenize: bool = True
    """Make the output's text (vLLM's); False leaves it empty, for callers that read token ids
    alone, and refuses stop strings, which are found in the text."""
    logprobs: int | None = None
    """Return the logprob of each sampled token and of this many most likely tokens; None returns none."""
    prompt_logprobs: int | None = None
    """As logprobs, for each prompt token after the first."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token already generated; in [-2, 2] as in OpenAI's API."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time it was generated; in [-2, 2]."""
    repetition_penalty: float = 1.0
    """Divides positive (multiplies negative) logits of tokens in the prompt or output; 1 is off."""
    logit_bias: dict[int, float] | None = None
    """Added to these token ids' logits before the penalties, greedy rows too; each in [-100, 100]
    as in OpenAI's API (-100 all but bans a token, 100 all but forces it); at most
    ``MAX_LOGIT_BIAS`` of them. None when empty."""
    allowed_token_ids: list[int] | None = None
    """Only these token ids may be generated (vLLM's); None allows every token. Stored sorted,
    without repeats."""
    bad_words: list[str] | None = None
    """Words never generated (vLLM's): where the output ends in all of a word's tokens but its
    last, that last token may not come next. A word is spelt as the tokenizer writes it alone
    and after a space (``loader.tokenizer.bad_word_token_ids``). None when empty."""
    structured_outputs: StructuredOutputsParams | None = None
    """Hold the text to a JSON schema, regex, choice or grammar (vLLM's); None leaves it free.
    The sequence ends ("stop") on the token that completes it, min_tokens or not."""
    truncate_prompt_tokens: int | None = None
    """Keep only the prompt's last this many tokens (left truncation, vLLM's); -1 keeps as many as
    leave room in the context for one output token; None keeps them all."""
    output_kind: str = "cumulative"
    """What ``LLMEngine.step`` returns for this request (vLLM's ``RequestOutputKind``):
    "cumulative", its whole output so far on every step that extends it; "delta", only what
    each such step added (the text, tokens and logprobs since the last output; prompt logprobs
    in the first; completions that gained nothing left out), which a streaming server sends on
    without copying the growing output every step; or "final_only", one output when it
    finishes (``LLM.generate``)."""

    def __post_init__(self) -> None:
        self._check_counts()
        self._check_distribution()
        self._check_penalties()
        self._check_logit_bias()
        self._check_token_lists()
        _require(
            self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputsParams),
            "structured_outputs",
            self.structured_outputs,
            "must be None or StructuredOutputsParams",
        )
        self._check_logprobs()
        self._normalize_stops()
        # Integers of other kinds (NumPy's) are stored as Python ints, as the numbers are as floats.
        for name in ("n", "max_tokens", "min_tokens", "seed", "logprobs", "prompt_logprobs", "truncate_prompt_tokens"):
            value = getattr(self, name)
            if value is not None:
                self._set(name, int(value))

    @property
    def is_greedy(self) -> bool:
        """Whether the next token is the argmax; top_k, top_p, min_p and seed then have no effect."""
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        """Whether a repetition, frequency or presence penalty applies (they read the tokens so far)."""
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    @functools.cached_property
    def allowed_token_array(self) -> np.ndarray | None:
        """``allowed_token_ids`` as int64, made once: every step's sampler reads it for each row,
        and it may hold most of the vocabulary."""
        return None if self.allowed_token_ids is None else np.array(self.allowed_token_ids, dtype=np.int64)

    @functools.cached_property
    def allowed_token_set(self) -> frozenset[int] | None:
        """``allowed_token_ids`` as a set, made once (``RowState.forbids_every_token`` asks of
        a few tokens each step whether they are among them)."""
        return None if self.allowed_token_ids is None else frozenset(self.allowed_token_ids)

    @property
    def has_token_bias(self) -> bool:
        """Whether logit_bias, allowed_token_ids, bad_words or structured_outputs add to some
        logits (their sampling feature is "logit_bias": one dense bias a row, -inf where a token
        may not come)."""
        return bool(self.logit_bias or self.allowed_token_ids or self.bad_words or self.structured_outputs)

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def _check_counts(self) -> None:
        _require(is_integral(self.n) and 1 <= self.n <= MAX_N, "n", self.n, f"must be an integer in [1, {MAX_N}]")
        _require(
            self.max_tokens is None or (is_integral(self.max_tokens) and self.max_tokens >= 1),
            "max_tokens",
            self.max_tokens,
            "must be None or an integer >= 1",
        )
        _require(is_integral(self.min_tokens) and self.min_tokens >= 0, "min_tokens", self.min_tokens, "must be >= 0")
        _require(
            self.max_tokens is None or self.min_tokens <= self.max_tokens,
            "min_tokens",
            self.min_tokens,
            f"must be <= max_tokens={self.max_tokens}",
        )
        _require(
            self.seed is None or (is_integral(self.seed) and MIN_SEED <= self.seed <= MAX_SEED),
            "seed",
            self.seed,
            "must be None or an integer in [-2**63, 2**64)",
        )
        if self.seed == -1:
            self._set("seed", None)
        truncate = self.truncate_prompt_tokens
        _require(
            truncate is None or (is_integral(truncate) and (truncate >= 1 or truncate == -1)),
            "truncate_prompt_tokens",
            truncate,
            "must be None, -1 (as many as leave room for one output token) or an integer >= 1",
        )
        for name in (
            "ignore_eos",
            "include_stop_str_in_output",
            "skip_special_tokens",
            "spaces_between_special_tokens",
            "detokenize",
        ):
            _require(isinstance(getattr(self, name), bool), name, getattr(self, name), "must be a bool")
        _require(self.output_kind in OUTPUT_KINDS, "output_kind", self.output_kind, f"must be one of {OUTPUT_KINDS}")

    def _check_distribution(self) -> None:
        _require(is_finite_number(self.temperature), "temperature", self.temperature, "must be a finite number")
        _require(self.temperature >= 0, "temperature", self.temperature, "must be >= 0")
        why = f"must be <= {MAX_TEMPERATURE:g}"
        _require(self.temperature <= MAX_TEMPERATURE, "temperature", self.temperature, why)
        if 0 < self.temperature < MIN_TEMPERATURE:
            logger.warning(
                "temperature=%r is below %r and is raised to it (only 0 is greedy)", self.temperature, MIN_TEMPERATURE
            )
            self._set("temperature", MIN_TEMPERATURE)
        _require(is_finite_number(self.top_p), "top_p", self.top_p, "must be a finite number")
        _require(0 < self.top_p <= 1, "top_p", self.top_p, "must be in (0, 1]")
        _require(is_integral(self.top_k), "top_k", self.top_k, "must be an integer")
        _require(self.top_k >= -1, "top_k", self.top_k, "must be >= 1, or 0 or -1 to keep all tokens")
        _require(is_finite_number(self.min_p), "min_p", self.min_p, "must be a finite number")
        _require(0 <= self.min_p <= 1, "min_p", self.min_p, "must be in [0, 1]")
        self._set("temperature", float(self.temperature))
        self._set("top_p", float(self.top_p))
        self._set("min_p", float(self.min_p))
        self._set("top_k", max(int(self.top_k), 0))

    def _check_penalties(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _require(is_finite_number(value), name, value, "must be a finite number")
            _require(-2 <= value <= 2, name, value, "must be in [-2, 2]")
            self._set(name, float(value))
        value = self.repetition_penalty
        _require(is_finite_number(value), "repetition_penalty", value, "must be a finite number")
        low, high = REPETITION_PENALTY_RANGE
        _require(low <= value <= high, "repetition_penalty", value, f"must be in [{low:g}, {high:g}]")
        self._set("repetition_penalty", float(value))

    def _check_logit_bias(self) -> None:
        bias = self.logit_bias
        _require(
            bias is None or isinstance(bias, dict), "logit_bias", bias, "must be None or a dict of token id to bias"
        )
        if len(bias or ()) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias=<{len(bias)} token ids>: at most {MAX_LOGIT_BIAS} may be biased")
        checked = {}
        for token_id, value in (bias or {}).items():
            # The entry at fault is shown, not the whole map: it may hold thousands.
            entry = {token_id: value}
            _require(is_integral(token_id) and token_id >= 0, "logit_bias", entry, "token ids must be integers >= 0")
            in_range = is_finite_number(value) and -100 <= value <= 100
            _require(in_range, "logit_bias", entry, "biases must be in [-100, 100]")
            checked[int(token_id)] = float(value)
        self._set("logit_bias", checked or None)

    def _check_token_lists(self) -> None:
        allowed = self.allowed_token_ids
        _require(
            allowed is None or _is_list_of(allowed, _is_token_id),
            "allowed_token_ids",
            allowed,
            "must be None or a list of token ids >= 0",
        )
        if allowed is not None:
            # An empty list would leave nothing to sample, not everything.
            _require(len(allowed) > 0, "allowed_token_ids", allowed, "must hold at least one token id")
            self._set("allowed_token_ids", sorted({int(i) for i in allowed}))
        words = self.bad_words
        _require(
            words is None or _is_list_of(words, lambda w: isinstance(w, str)),
            "bad_words",
            words,
            "must be None or a list of strings",
        )
        _check_sizes("bad_words", words or [], "word", MAX_BAD_WORDS, MAX_BAD_WORD_CHARS)
        _require(all(w.strip() for w in words or ()), "bad_words", words, "words must hold more than white space")
        self._set("bad_words", list(words) if words else None)

    def _check_logprobs(self) -> None:
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _require(
                value is None or (is_integral(value) and 0 <= value <= MAX_LOGPROBS),
                name,
                value,
                f"must be None or an integer in [0, {MAX_LOGPROBS}]",
            )

    def _normalize_stops(self) -> None:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        _require(
            stop is None or _is_list_of(stop, lambda s: isinstance(s, str)),
            "stop",
            self.stop,
            "must be None, a string or a list of strings",
        )
        stop = list(stop or [])
        _require(all(stop), "stop", self.stop, "stop strings must be non-empty")
        _check_sizes("stop", stop, "string", MAX_STOP_STRINGS, MAX_STOP_STRING_CHARS)
        _require(not stop or self.detokenize, "stop", self.stop, "stop strings need detokenize=True")
        self._set("stop", stop)
        ids = self.stop_token_ids
        _require(
            ids is None or _is_list_of(ids, _is_token_id),
            "stop_token_ids",
            ids,
            "must be None or a list of token ids >= 0",
        )
        if len(ids or ()) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"stop_token_ids=<{len(ids)} token ids>: at most {MAX_STOP_TOKEN_IDS} may be given")
        self._set("stop_token_ids", list(dict.fromkeys(int(i) for i in ids or [])))


def _check_sizes(name: str, strings: list[str], noun: str, max_count: int, max_chars: int) -> None:
    """``ValueError`` naming ``name`` where it holds over ``max_count`` strings or one over ``max_chars``."""
    if len(strings) > max_count:
        raise ValueError(f"{name}=<{len(strings)} {noun}s>: at most {max_count} may be given")
    longest = max(map(len, strings), default=0)
    if longest > max_chars:
        raise ValueError(f"{name}=<a {noun} of {longest} characters>: a {noun} may have at most {max_chars}")


def truncated_prompt(token_ids: list[int], truncate_prompt_tokens: int, max_seq_len: int) -> list[int]:
    """The last tokens of a prompt that ``truncate_prompt_tokens`` keeps: -1 as many as leave room
    for one output token within ``max_seq_len``, the longest sequence the engine runs (a prompt
    that fills it is refused)."""
    keep = max_seq_len - 1 if truncate_prompt_tokens == -1 else truncate_prompt_tokens
    return token_ids[max(0, len(token_ids) - keep) :]

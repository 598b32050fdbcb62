"""Token ids to streamed text, with stop strings.

Two problems make "decode each new token on its own" wrong:

- A character may span several tokens (byte-level BPE and SentencePiece byte fallback split
  an emoji or a CJK character into bytes). Decoding part of it gives U+FFFD.
- A token's text may depend on its neighbours (SentencePiece drops the leading space of the
  first token of a decoded sequence, so "▁world" alone decodes as "world").

So ``TokenDecoder`` decodes a short window twice, with and without the pending tokens, and
emits the difference once the pending tokens' bytes end on a character boundary::

    ids:  | prefix window | pending (not yet emitted) |
          0          read_offset                    end
    emit  decode(ids)[len(decode(ids[:read_offset])):]

SentencePiece's byte fallback decodes a run of byte tokens that is not valid UTF-8 as one
U+FFFD a byte, valid characters included, so a bad byte would rewrite text already streamed:
byte tokens are decoded by an incremental UTF-8 decoder instead (see ``TokenDecoder``).

``StopChecker`` then cuts the text at the first stop string, holding back any tail that
could be the start of one until the next piece settles it. ``IncrementalDetokenizer`` joins
the two for one sequence.
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import json
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from neuron_llm.sampling_params import SamplingParams

_PROMPT_CONTEXT_TOKENS = 5
"""Prompt tokens decoded before the first output token, so it gets the spacing it has in context."""

_INCOMPLETE = "\ufffd"


class TokenDecoder:
    """Turns token ids, fed one at a time, into text pieces that concatenate correctly.

    Special tokens are left out when ``skip_special_tokens``. A character whose bytes are not
    all in yet is held back until the token completing it arrives; ``flush`` releases what is
    held when the sequence ends, so the pieces always join into the whole text.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
        texts: TokenTexts | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._texts = texts if texts is not None else TokenTexts(tokenizer)
        """The tokenizer's token bytes, best shared by every sequence (an engine's caches them)."""
        self._special = self._texts.special if skip_special_tokens else frozenset()
        self._piece_bytes = self._texts.piece_bytes
        self._is_byte_fallback = self._piece_bytes is _sentencepiece_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        """The bytes of the pending tokens, to tell when they end inside a character."""
        # Skipped special tokens are left out of every decode, so out of the prompt's window too:
        # a prompt ending in a run of them would leave no text before the first output token.
        prompt = [token_id for token_id in prompt_token_ids if token_id not in self._special]
        # Only ids from the prefix window on are kept: [0, read_offset) was emitted already.
        self._token_ids = prompt[-_PROMPT_CONTEXT_TOKENS:]
        self._read_offset = len(self._token_ids)
        # A prompt may end inside a character (a client continuing a completion cut there). Its
        # bytes wait for the output's, and the character they start belongs to neither text:
        # the diff of two decodes skips it, and byte fallback's own decode below drops it.
        self._utf8.decode(b"".join(map(self._token_bytes, prompt[-3:])))
        self._owes_prompt_character = self._is_byte_fallback and self._is_inside_character()
        # No token of the text yet: SentencePiece's decoder strips a text's leading space, which
        # the byte tokens' own decoding (``_owed``) must do too where they begin the text.
        self._opens_text = self._is_byte_fallback and not self._token_ids

    def add_token(self, token_id: int) -> str:
        """Append ``token_id``; return the text it completes (may be empty)."""
        if token_id in self._special and not self._decode([token_id]):
            # Left out of every decode, so out of the window too: a long run of skipped tokens
            # (a degenerate output) would otherwise be decoded again with each new token.
            return ""
        if self._is_byte_fallback:
            return self._add_sentencepiece_token(token_id)
        self._token_ids.append(token_id)
        if self._piece_bytes is None:
            # A scheme whose bytes are unknown: hold while the text ends in an unfinished character.
            text, prefix_length = self._decode_window()
            return "" if text.endswith(_INCOMPLETE) else self._release(text, prefix_length)
        self._utf8.decode(self._token_bytes(token_id))
        return "" if self._is_inside_character() else self._release(*self._decode_window())

    def flush(self) -> str:
        """The text still held when the sequence ends: an unfinished character decodes as U+FFFD."""
        text = self._settle_bytes() if self._is_byte_fallback else ""
        return text + self._release(*self._decode_window())

    def _add_sentencepiece_token(self, token_id: int) -> str:
        # Byte fallback decodes a run of byte tokens as UTF-8 only if the whole run is valid,
        # else as one U+FFFD a byte: a bad byte would rewrite characters already streamed. So
        # byte tokens are decoded here, by an incremental UTF-8 decoder (one U+FFFD a bad
        # sequence, as SentencePiece itself does), which gives the tokenizer's text for valid
        # runs. Diffs of decodes give the other tokens' text, which a run before them cannot
        # change: both decodes hold the same run.
        byte = _byte_token_value(self._tokenizer.convert_ids_to_tokens(token_id))
        if byte is None:
            text = self._settle_bytes()
            self._token_ids.append(token_id)
            self._opens_text = False  # a lone "▁" decodes as nothing, its space stripped
            return text + self._release(*self._decode_window())
        text = self._release(*self._decode_window())  # tokens that gave no text yet
        self._token_ids, self._read_offset = [token_id], 1
        return text + self._owed(self._utf8.decode(bytes([byte])))

    def _settle_bytes(self) -> str:
        return self._owed(self._utf8.decode(b"", final=True))

    def _owed(self, text: str) -> str:
        # The first character out of the decoder ends the prompt's split one (or is its U+FFFD).
        if text and self._owes_prompt_character:
            self._owes_prompt_character = False
            return text[1:]
        if text and self._opens_text:
            self._opens_text = False
            if self._texts.strips_leading_space:
                return text.removeprefix(" ")
        return text

    def _is_inside_character(self) -> bool:
        return bool(self._utf8.getstate()[0])

    def _decode_window(self) -> tuple[str, int]:
        """The window's text, and how much of it the emitted prefix makes."""
        if len(self._token_ids) == self._read_offset:
            return "", 0
        return self._decode(self._token_ids), len(self._decode(self._token_ids[: self._read_offset]))

    def _release(self, text: str, prefix_length: int) -> str:
        """Emit the pending tokens' text; they become the next prefix window."""
        if len(text) <= prefix_length:
            return ""
        self._token_ids = self._token_ids[self._read_offset :]
        self._read_offset = len(self._token_ids)
        self._utf8.reset()
        return text[prefix_length:]

    def _decode(self, token_ids: list[int]) -> str:
        # Cleanup (e.g. " ." -> ".") would rewrite text already emitted; decode verbatim.
        return self._tokenizer.decode(
            token_ids, skip_special_tokens=self._skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def _token_bytes(self, token_id: int) -> bytes:
        return self._texts.raw_bytes(token_id) if self._piece_bytes is not None else b""


class StopChecker:
    """Finds stop strings in a stream of text pieces, even when one spans several pieces.

    Text is released only once it cannot be part of a stop string: a tail that is the start
    of one is held back until the next piece completes or rules it out. When several stop
    strings are in the text, the one that ends first wins (ties: the longest), which is the
    one a character-by-character stream would have met first.
    """

    def __init__(self, stop: Sequence[str]) -> None:
        assert all(stop), "stop strings must be non-empty"
        self._stop = list(stop)
        self._pending = ""
        self._locked = 0
        """How much of the pending text came before min_tokens: no match may end inside it."""

    def feed(self, piece: str, can_stop: bool = True) -> tuple[str, str | None]:
        """Add ``piece``; return (text now safe to emit, the stop string found or None).

        After a stop string is found, the emitted text ends right before it and nothing
        more should be fed. With ``can_stop`` False (min_tokens not reached) nothing matches
        yet, but a possible stop-string start is still held back.
        """
        text = self._pending + piece
        if can_stop:
            found = self._first_match(text)
            if found is not None:
                start, stop = found
                self._pending = ""
                return text[:start], stop
        held = self._held_length(text)
        released = len(text) - held
        self._locked = held if not can_stop else max(0, self._locked - released)
        self._pending = text[released:]
        return text[:released], None

    def flush(self) -> str:
        """Release the held-back tail, when the sequence ends for another reason."""
        text, self._pending, self._locked = self._pending, "", 0
        return text

    def _first_match(self, text: str) -> tuple[int, str] | None:
        best: tuple[int, int, str] | None = None
        for stop in self._stop:
            # A stop string complete before min_tokens was reached does not count.
            start = text.find(stop, max(0, self._locked - len(stop) + 1))
            if start < 0:
                continue
            # Sort key: earliest end, then earliest start.
            candidate = (start + len(stop), start, stop)
            if best is None or candidate < best:
                best = candidate
        return None if best is None else (best[1], best[2])

    def _held_length(self, text: str) -> int:
        # The longest suffix of text that is a proper prefix of some stop string.
        longest = min(len(text), max((len(s) for s in self._stop), default=1) - 1)
        for length in range(longest, 0, -1):
            tail = text[-length:]
            if any(stop.startswith(tail) for stop in self._stop):
                return length
        return 0


@dataclass
class DetokenizerUpdate:
    """What one new token adds to a sequence's text."""

    text: str
    """The text to emit now (may be empty while a character or a possible stop string is held)."""
    stop_string: str | None
    """The stop string that ended the sequence, cut from the text; None when it goes on."""


class IncrementalDetokenizer:
    """The text of one generated sequence, built token by token, with its stop strings.

    As in vLLM, stop strings are looked for only once more than ``min_tokens`` tokens have
    been generated, and the token that completes a stop string stays in the token ids while
    the text is cut before the stop string, or after it with ``include_stop_str_in_output``.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: Sequence[int] = (),
        stop: Sequence[str] = (),
        min_tokens: int = 0,
        skip_special_tokens: bool = True,
        include_stop_str_in_output: bool = False,
        texts: TokenTexts | None = None,
    ) -> None:
        self._decoder = TokenDecoder(tokenizer, prompt_token_ids, skip_special_tokens, texts)
        self._stop_checker = StopChecker(stop) if stop else None
        self._include_stop = include_stop_str_in_output
        self._min_tokens = min_tokens
        self._num_tokens = 0
        self._can_stop = False
        self._is_stopped = False
        self.output_text = ""
        """All text emitted so far."""

    @classmethod
    def for_request(
        cls,
        tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        texts: TokenTexts | None = None,
    ) -> IncrementalDetokenizer:
        """The detokenizer of one sequence of a request with these sampling parameters."""
        return cls(
            tokenizer,
            prompt_token_ids,
            params.stop or (),
            params.min_tokens,
            params.skip_special_tokens,
            params.include_stop_str_in_output,
            texts,
        )

    def add_token(self, token_id: int, ends_sequence: bool = False) -> DetokenizerUpdate:
        """Decode the next generated token; see ``DetokenizerUpdate``.

        ``ends_sequence``: the token ends the sequence itself (an EOS or stop token kept in the
        text), so, as in vLLM, no stop string is looked for in its text.
        """
        assert not self._is_stopped, "the sequence already ended on a stop string"
        self._num_tokens += 1
        self._can_stop = self._num_tokens > self._min_tokens and not ends_sequence
        return self._emit(self._decoder.add_token(token_id))

    def finish(self) -> DetokenizerUpdate:
        """Release the text held back, when the sequence ends other than on a stop string.

        A character left unfinished by the last token ends as U+FFFD. Released text may
        complete a stop string (it held a character the stop string ends in): then it is cut
        there, and the update names that stop string.
        """
        update = self._emit(self._decoder.flush())
        if update.stop_string is None and self._stop_checker is not None:
            tail = self._stop_checker.flush()
            self.output_text += tail
            update.text += tail
        return update

    def _emit(self, piece: str) -> DetokenizerUpdate:
        stop_string = None
        if self._stop_checker is not None:
            piece, stop_string = self._stop_checker.feed(piece, can_stop=self._can_stop)
        self._is_stopped = stop_string is not None
        if stop_string is not None and self._include_stop:
            piece += stop_string
        self.output_text += piece
        return DetokenizerUpdate(piece, stop_string)


class TokenTexts:
    """Each token id's text alone and the bytes it adds to a text, cached: logprobs name tokens by both.

    A token that is part of a multi-byte character decodes to U+FFFD on its own, as in vLLM,
    but its bytes are the part of the character it holds, so the bytes of a sequence's tokens
    join into the sequence's text (OpenAI's ``bytes``).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None) -> None:
        self._tokenizer = tokenizer
        self._texts: dict[int, str] = {}
        self._bytes: dict[int, bytes] = {}
        self.piece_bytes = _piece_bytes_reader(tokenizer)
        """How the vocabulary's pieces map to bytes; None for a scheme other than Llamas' two."""
        added = tokenizer.added_tokens_decoder if tokenizer is not None else {}
        # Added tokens are stored as their text, not in the vocabulary's byte alphabet.
        self._added = frozenset(added)
        self.special = frozenset(token_id for token_id, token in added.items() if token.special)
        """The ids that decoding with ``skip_special_tokens`` leaves out."""

    @functools.cached_property
    def strips_leading_space(self) -> bool:
        """Whether decoding drops the leading space of a text even where a byte token makes it
        (SentencePiece's Strip decoder, Llama 2's): " A" of byte tokens decodes as "A"."""
        if self._tokenizer is None:
            return False
        ids = self._tokenizer.convert_tokens_to_ids(["<0x20>", "<0x41>"])
        if None in ids or self._tokenizer.unk_token_id in ids:
            return False
        return self._decode_ids(ids) == "A"

    def __call__(self, token_id: int) -> str:
        if token_id not in self._texts:
            self._texts[token_id] = self._decode(token_id)
        return self._texts[token_id]

    def raw_bytes(self, token_id: int) -> bytes:
        """The bytes ``token_id`` adds to a decoded text (SentencePiece: with its leading space)."""
        if token_id not in self._bytes:
            self._bytes[token_id] = self._raw_bytes(token_id)
        return self._bytes[token_id]

    def is_special(self, token_id: int) -> bool:
        """Whether decoding with ``skip_special_tokens`` leaves ``token_id`` out."""
        return token_id in self.special

    def _decode(self, token_id: int) -> str:
        if self._tokenizer is None:
            return f"token_id:{token_id}"
        return self._decode_ids([token_id])

    def _decode_ids(self, token_ids: list[int]) -> str:
        assert self._tokenizer is not None
        return str(self._tokenizer.decode(token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False))

    def _raw_bytes(self, token_id: int) -> bytes:
        if self._tokenizer is None:
            return b""  # no tokenizer, no text
        # None: an id past the tokenizer's vocabulary (a model's embedding padded beyond it).
        piece = self._tokenizer.convert_ids_to_tokens(token_id) if token_id not in self._added else None
        if self.piece_bytes is not None and piece is not None:
            with contextlib.suppress(KeyError):
                return self.piece_bytes(piece)
        return self(token_id).encode()


def _piece_bytes_reader(tokenizer: PreTrainedTokenizerBase | None) -> Callable[[str], bytes] | None:
    """How vocabulary pieces map to bytes, for the two schemes Llamas use; None for any other."""
    if tokenizer is None:
        return None
    # Reading the decoder's kind parses its JSON (up to half a millisecond): once a tokenizer.
    if tokenizer not in _PIECE_BYTES_READERS:
        _PIECE_BYTES_READERS[tokenizer] = _read_piece_bytes_reader(tokenizer)
    return _PIECE_BYTES_READERS[tokenizer]


_PIECE_BYTES_READERS: weakref.WeakKeyDictionary[PreTrainedTokenizerBase, Callable[[str], bytes] | None] = (
    weakref.WeakKeyDictionary()
)


def _read_piece_bytes_reader(tokenizer: PreTrainedTokenizerBase) -> Callable[[str], bytes] | None:
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if decoder is None:
        return None
    state = json.loads(decoder.__getstate__())
    kinds = {state["type"], *(inner["type"] for inner in state.get("decoders", ()))}
    if "ByteLevel" in kinds:
        table = _byte_level_alphabet()
        return lambda piece: bytes(table[char] for char in piece)
    if "ByteFallback" in kinds:
        return _sentencepiece_bytes
    return None


def _byte_level_alphabet() -> dict[str, int]:
    # GPT-2's byte-level BPE writes printable Latin-1 bytes as themselves and every other byte
    # as chr(256 + n), n counting those bytes in order.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    return {chr(byte): byte for byte in printable} | {chr(256 + n): byte for n, byte in enumerate(others)}


def _sentencepiece_bytes(piece: str) -> bytes:
    # "<0xE4>" is one raw byte (byte fallback); "▁" stands for a space.
    byte = _byte_token_value(piece)
    return piece.replace("▁", " ").encode() if byte is None else bytes([byte])


def _byte_token_value(piece: str | None) -> int | None:
    if piece is not None and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        with contextlib.suppress(ValueError):
            return int(piece[3:5], 16)
    return None

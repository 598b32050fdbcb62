from __future__ import annotations

import random

import pytest
from transformers import PreTrainedTokenizerBase

from neuron_llm.detokenizer import IncrementalDetokenizer, StopChecker, TokenTexts
from neuron_llm.sampling_params import SamplingParams
from tests.tokenizer_kinds import TEXTS, sentencepiece_bpe, stream


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_full_decode(tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    token_ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = stream(tokenizer, token_ids)
    assert "".join(pieces) == tokenizer.decode(token_ids, skip_special_tokens=True)
    assert all("\ufffd" not in piece for piece in pieces)


def test_multibyte_characters_span_several_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    # Guards the test above: the held-back path must actually be exercised.
    token_ids = tokenizer.encode("世界 😀", add_special_tokens=False)
    assert any("\ufffd" in tokenizer.decode([t]) for t in token_ids)
    assert "" in stream(tokenizer, token_ids)


def test_special_tokens_are_skipped(tokenizer: PreTrainedTokenizerBase) -> None:
    special = [tokenizer.eos_token_id]
    token_ids = special + tokenizer.encode("hello 世界", add_special_tokens=False) + special
    token_ids += tokenizer.encode(" the fox", add_special_tokens=False)
    pieces = stream(tokenizer, token_ids)
    assert "".join(pieces) == tokenizer.decode(token_ids, skip_special_tokens=True)
    assert tokenizer.eos_token not in "".join(pieces)


def test_a_run_of_skipped_special_tokens_does_not_grow_the_decoded_window(
    tokenizer: PreTrainedTokenizerBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    words = tokenizer.encode(" the fox 世界", add_special_tokens=False)
    token_ids = words + [tokenizer.eos_token_id] * 500 + words
    decoded_lengths: list[int] = []
    original = tokenizer.decode

    def counting_decode(ids: list[int], **kwargs: object) -> str:
        decoded_lengths.append(len(ids))
        return original(ids, **kwargs)

    monkeypatch.setattr(tokenizer, "decode", counting_decode)
    pieces = stream(tokenizer, token_ids)
    assert "".join(pieces) == original(token_ids, skip_special_tokens=True)
    assert max(decoded_lengths) <= 2 * len(words)


@pytest.mark.parametrize("text", ["the quick brown fox jumps over the lazy dog", TEXTS[2]])
def test_output_after_a_prompt_keeps_its_spacing(tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    token_ids = tokenizer.encode(text, add_special_tokens=False)
    checked = 0
    for split in range(1, len(token_ids)):
        prompt_text = tokenizer.decode(token_ids[:split])
        if "\ufffd" in prompt_text:
            continue  # the prompt itself ends inside a character
        checked += 1
        expected = tokenizer.decode(token_ids)[len(prompt_text) :]
        pieces = stream(tokenizer, token_ids[split:], token_ids[:split])
        assert "".join(pieces) == expected
        assert all("\ufffd" not in piece for piece in pieces)
    assert checked > 5


@pytest.mark.parametrize("padding", [1, 5, 9])
def test_output_after_a_prompt_ending_in_special_tokens_keeps_its_spacing(
    tokenizer: PreTrainedTokenizerBase, padding: int
) -> None:
    """Skipped special tokens give no context: a run of them must not leave the first output
    token at the start of the decoded window, where SentencePiece drops its space."""
    prompt_ids = tokenizer.encode("hello", add_special_tokens=False) + [tokenizer.eos_token_id] * padding
    token_ids = tokenizer.encode("hello the fox", add_special_tokens=False)[len(prompt_ids) - padding :]
    expected = tokenizer.decode(prompt_ids + token_ids, skip_special_tokens=True)
    prompt_text = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    assert expected[len(prompt_text) :].startswith(" ")
    assert "".join(stream(tokenizer, token_ids, prompt_ids)) == expected[len(prompt_text) :]


@pytest.mark.parametrize("text", TEXTS[1:3])
def test_a_prompt_split_inside_a_character_loses_that_character_only(
    tokenizer: PreTrainedTokenizerBase, text: str
) -> None:
    # A client continuing a completion cut mid-character sends prompt + output ids: the split
    # character is in neither text, and all that follows it is in the output's.
    token_ids = tokenizer.encode(text, add_special_tokens=False)
    full = tokenizer.decode(token_ids)
    texts = TokenTexts(tokenizer)
    full_bytes = b"".join(map(texts.raw_bytes, token_ids))
    stripped = len(full_bytes.decode()) - len(full)  # SentencePiece's leading space
    checked = 0
    for split in range(1, len(token_ids)):
        prompt_bytes = b"".join(map(texts.raw_bytes, token_ids[:split]))
        whole_characters = len(prompt_bytes.decode(errors="ignore"))
        if whole_characters == len(prompt_bytes.decode(errors="replace")):
            continue  # the prompt ends on a character boundary
        checked += 1
        expected = full[whole_characters - stripped + 1 :]
        assert "".join(stream(tokenizer, token_ids[split:], token_ids[:split])) == expected, split
    assert checked > 3


def test_a_split_character_the_output_never_completes_is_in_neither_text() -> None:
    # Byte fallback decodes the prompt's unfinished bytes as one U+FFFD each, all skipped.
    tokenizer = sentencepiece_bpe()
    prompt = tokenizer.encode("hi 世", add_special_tokens=False)[:-1]
    assert tokenizer.convert_ids_to_tokens(prompt)[-2:] == ["<0xE4>", "<0xB8>"]
    output = tokenizer.encode("the fox", add_special_tokens=False)
    assert "".join(stream(tokenizer, output, prompt)) == " the fox"


def test_sentencepiece_token_text_depends_on_its_neighbours() -> None:
    tokenizer = sentencepiece_bpe()
    token_ids = tokenizer.encode("the fox", add_special_tokens=False)
    # Decoded alone, a "▁x" token loses its space; streamed, it keeps it.
    assert "".join(tokenizer.decode([t]) for t in token_ids) != "the fox"
    assert "".join(stream(tokenizer, token_ids)) == "the fox"


@pytest.mark.parametrize("text", TEXTS)
def test_token_bytes_join_into_the_streamed_text(tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    """OpenAI's ``bytes``: each token's own bytes, so the tokens of a split character rejoin."""
    prompt_ids = tokenizer.encode("say:", add_special_tokens=False)
    token_ids = tokenizer.encode(text, add_special_tokens=False)
    texts = TokenTexts(tokenizer)
    joined = b"".join(texts.raw_bytes(token_id) for token_id in token_ids)
    assert joined.decode() == "".join(stream(tokenizer, token_ids, prompt_ids))


def test_special_tokens_are_their_text_and_known_as_skipped(tokenizer: PreTrainedTokenizerBase) -> None:
    texts = TokenTexts(tokenizer)
    eos, word = tokenizer.eos_token_id, tokenizer.encode("hello", add_special_tokens=False)[0]
    assert texts.is_special(eos) and tokenizer.decode([eos], skip_special_tokens=True) == ""
    assert texts.raw_bytes(eos) == tokenizer.eos_token.encode()
    assert not texts.is_special(word)


def _feed_all(checker: StopChecker, pieces: list[str]) -> tuple[list[str], str | None]:
    emitted = []
    for piece in pieces:
        text, stop = checker.feed(piece)
        emitted.append(text)
        if stop is not None:
            return emitted, stop
    emitted.append(checker.flush())
    return emitted, None


def test_stop_string_across_pieces_is_never_emitted() -> None:
    emitted, stop = _feed_all(StopChecker(["STOP"]), ["Hel", "lo S", "T", "OP and more"])
    assert emitted == ["Hel", "lo ", "", ""] and stop == "STOP"


def test_held_tail_is_released_when_it_is_not_a_stop_string() -> None:
    checker = StopChecker(["STOP"])
    assert checker.feed("ab S") == ("ab ", None)
    assert checker.feed("TO") == ("", None)
    assert checker.feed("x") == ("STOx", None)
    assert checker.feed(" ST") == (" ", None)
    assert checker.flush() == "ST"


def test_first_ending_stop_string_wins_and_is_reported() -> None:
    assert StopChecker(["abcd", "bc"]).feed("xabcdy") == ("xa", "bc")
    assert StopChecker(["world", "o w"]).feed("hello world") == ("hell", "o w")
    assert StopChecker(["ab", "xab"]).feed("..xab") == ("..", "xab")


def test_stop_strings_are_ignored_while_stopping_is_not_allowed() -> None:
    checker = StopChecker(["##"])
    assert checker.feed("a##b#", can_stop=False) == ("a##b", None)
    assert checker.feed("#c") == ("", "##")


def test_a_stop_string_held_back_before_min_tokens_does_not_count_later() -> None:
    # "\n" is held as the start of "\n\nUser:", and it was complete before stopping was allowed.
    checker = StopChecker(["\n", "\n\nUser:"])
    assert checker.feed("Hi", can_stop=False) == ("Hi", None)
    assert checker.feed("\n", can_stop=False) == ("", None)
    assert checker.feed(" there") == ("\n there", None)
    assert checker.feed("\n") == ("", "\n")
    checker = StopChecker(["\n", "\n\nUser:"])
    checker.feed("Hi\n", can_stop=False)
    assert checker.feed("\nUser:") == ("\n", "\n")


def test_stop_search_is_independent_of_how_the_text_is_split() -> None:
    rng = random.Random(0)
    text = "one two three. four;; five END six"
    stops = [";;", "END", "thr", "x"]
    cut = text.index("thr")
    for _ in range(200):
        bounds = sorted(rng.sample(range(1, len(text)), rng.randint(0, 8)))
        pieces = [text[i:j] for i, j in zip([0, *bounds], [*bounds, len(text)])]
        emitted, stop = _feed_all(StopChecker(stops), pieces)
        assert "".join(emitted) == text[:cut] and stop == "thr"


def _detokenize(
    tokenizer: PreTrainedTokenizerBase, token_ids: list[int], params: SamplingParams
) -> tuple[list[str], str | None, int]:
    detokenizer = IncrementalDetokenizer.for_request(tokenizer, [], params)
    pieces = []
    for position, token_id in enumerate(token_ids):
        update = detokenizer.add_token(token_id)
        pieces.append(update.text)
        assert detokenizer.output_text == "".join(pieces)
        if update.stop_string is not None:
            return pieces, update.stop_string, position
    pieces.append(detokenizer.finish())
    return pieces, None, len(token_ids)


@pytest.mark.parametrize(
    ("text", "stop", "cut"),
    [
        ("the quick brown fox jumps over the lazy dog", "fox jum", "the quick brown "),
        ("héllo 世界 😀 wörld, the fox", "界 😀", "héllo 世"),
        ("hello world, hello there", "o t", "hello world, hell"),
    ],
)
def test_detokenizer_stops_on_a_string_spanning_tokens(
    tokenizer: PreTrainedTokenizerBase, text: str, stop: str, cut: str
) -> None:
    token_ids = tokenizer.encode(text, add_special_tokens=False)
    pieces, matched, position = _detokenize(tokenizer, token_ids, SamplingParams(stop=["zzz", stop]))
    assert matched == stop and "".join(pieces) == cut
    # It stops on the token that completes the stop string, no later.
    assert stop in tokenizer.decode(token_ids[: position + 1])
    assert stop not in tokenizer.decode(token_ids[:position])


def test_the_stop_string_stays_in_the_text_when_asked(tokenizer: PreTrainedTokenizerBase) -> None:
    token_ids = tokenizer.encode("hello world, hello there", add_special_tokens=False)
    params = SamplingParams(stop=["o t"], include_stop_str_in_output=True)
    pieces, matched, _ = _detokenize(tokenizer, token_ids, params)
    assert matched == "o t" and "".join(pieces) == "hello world, hello t"


def test_special_tokens_stay_in_the_text_when_asked(tokenizer: PreTrainedTokenizerBase) -> None:
    token_ids = [*tokenizer.encode("hi", add_special_tokens=False), tokenizer.eos_token_id]
    token_ids += tokenizer.encode(" there", add_special_tokens=False)
    kept, _, _ = _detokenize(tokenizer, token_ids, SamplingParams(skip_special_tokens=False))
    skipped, _, _ = _detokenize(tokenizer, token_ids, SamplingParams())
    assert "".join(kept) == tokenizer.decode(token_ids, skip_special_tokens=False)
    assert tokenizer.eos_token in "".join(kept) and tokenizer.eos_token not in "".join(skipped)


def test_detokenizer_without_a_match_releases_everything(tokenizer: PreTrainedTokenizerBase) -> None:
    text = "hello world, hello there"
    token_ids = tokenizer.encode(text, add_special_tokens=False)
    pieces, matched, _ = _detokenize(tokenizer, token_ids, SamplingParams(stop=["there!", "xyz"]))
    assert matched is None and "".join(pieces) == text
    assert pieces[-1] == "there", "the possible start of 'there!' is held back until the end"


def test_detokenizer_looks_for_stop_strings_only_after_min_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    text = "hello world, hello there"
    token_ids = tokenizer.encode(text, add_special_tokens=False)
    first_hello_end = next(i for i in range(len(token_ids)) if "hello" in tokenizer.decode(token_ids[: i + 1]))
    params = SamplingParams(stop="hello", min_tokens=first_hello_end + 1, max_tokens=100)
    pieces, matched, _ = _detokenize(tokenizer, token_ids, params)
    assert matched == "hello" and "".join(pieces) == "hello world, "

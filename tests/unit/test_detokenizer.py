from __future__ import annotations

import random

import pytest
from transformers import PreTrainedTokenizerBase

from neuron_llm.detokenizer import IncrementalDetokenizer, StopChecker, TokenTexts, _byte_level_alphabet
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


@pytest.mark.parametrize("prompt", ["", "<s>", "the"])
def test_a_space_of_byte_tokens_opening_the_text_is_stripped_as_decode_strips_it(prompt: str) -> None:
    # SentencePiece's decoder strips a text's leading space, a byte token's too: with no text
    # before the output (a prompt of BOS alone), " hello" of "<0x20>" and "▁hello" is "hello"
    # with one space, as vLLM's text; after "the", both spaces stay.
    tokenizer = sentencepiece_bpe()
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False) if prompt != "<s>" else [tokenizer.bos_token_id]
    space, hello = tokenizer.convert_tokens_to_ids(["<0x20>", "▁hello"])
    expected = " hello" if prompt != "the" else "  hello"
    assert "".join(stream(tokenizer, [space, hello], prompt_ids)) == expected
    assert "".join(stream(tokenizer, [space, space, hello], prompt_ids)) == " " + expected
    # After a lone "▁", which decodes as nothing (its space stripped), the text has begun.
    lone = tokenizer.convert_tokens_to_ids("▁")
    assert "".join(stream(tokenizer, [lone, space, hello], prompt_ids)) == " " + expected
    assert "".join(stream(tokenizer, [space, hello], [*prompt_ids, lone])) == "  hello"


def _byte_token_ids(tokenizer: PreTrainedTokenizerBase) -> dict[int, int]:
    """Each byte's own token: byte fallback's "<0xNN>", or byte-level BPE's alphabet."""
    vocab = tokenizer.get_vocab()
    if "<0x80>" in vocab:
        return {byte: vocab[f"<0x{byte:02X}>"] for byte in range(256)}
    # A trained vocabulary may lack bytes that never occur in UTF-8 (SmolLM2 lacks 0xC0).
    return {byte: vocab[char] for char, byte in _byte_level_alphabet().items() if char in vocab}


def _random_output(rng: random.Random, tokenizer: PreTrainedTokenizerBase, byte_ids: dict[int, int]) -> list[int]:
    """Words, characters split into bytes, bytes that are not UTF-8, real U+FFFDs and EOS, mixed."""
    high_bytes = [byte for byte in byte_ids if byte >= 0x80]
    token_ids: list[int] = []
    for _ in range(rng.randint(1, 10)):
        kind = rng.randrange(5)
        if kind == 0:
            word = rng.choice([" the fox", "hello", " 世界", "😀!", " é"])
            token_ids += tokenizer.encode(word, add_special_tokens=False)
        elif kind == 1:
            token_ids += [byte_ids[byte] for byte in rng.choice(["你好", "é", "😀", "\ufffd", " é"]).encode()]
        elif kind == 2:  # a character cut short, stray continuation bytes, bytes never in UTF-8
            token_ids += [byte_ids[byte] for byte in rng.choices(high_bytes, k=rng.randint(1, 3))]
        elif kind == 3:
            token_ids += [byte_ids[byte] for byte in "你好".encode()[: rng.randint(1, 5)]]
        else:
            token_ids.append(tokenizer.eos_token_id)
    return token_ids


def _text_of(
    tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int], token_ids: list[int], skip_special_tokens: bool
) -> str:
    """The output's text in the prompt's context, as decode gives it, except that a run of byte
    fallback's byte tokens that is not UTF-8 decodes as Python decodes its bytes (one U+FFFD a bad
    sequence; the tokenizer turns the whole run into U+FFFDs, one a byte)."""
    skipped = {tokenizer.eos_token_id} if skip_special_tokens else set()
    token_ids = [token_id for token_id in token_ids if token_id not in skipped]
    pieces = tokenizer.convert_ids_to_tokens(token_ids)
    if "<0x80>" in tokenizer.get_vocab():
        byte_ids = _byte_token_ids(tokenizer)
        rewritten: list[int] = []
        run = b""
        for token_id, piece in [*zip(token_ids, pieces, strict=True), (None, "")]:
            if len(piece) == 6 and piece.startswith("<0x"):
                run += bytes([int(piece[3:5], 16)])
                continue
            rewritten += [byte_ids[byte] for byte in run.decode(errors="replace").encode()]
            run = b""
            if token_id is not None:
                rewritten.append(token_id)
        token_ids = rewritten

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)

    return decode(prompt_ids + token_ids)[len(decode(prompt_ids)) :]


def test_streamed_text_is_the_decoded_text_for_any_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    """Pieces never rewrite what came before, and with what the end releases they are the
    text decode gives, whatever the bytes: unfinished characters, bad bytes, real U+FFFDs."""
    rng = random.Random(0)
    byte_ids = _byte_token_ids(tokenizer)
    for trial in range(300):
        prompt_ids = rng.choice([[], tokenizer.encode("hello there", add_special_tokens=False)])
        token_ids = _random_output(rng, tokenizer, byte_ids)
        skip = rng.random() < 0.7
        detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=skip)
        pieces = [detokenizer.add_token(token_id).text for token_id in token_ids]
        pieces.append(detokenizer.finish().text)
        expected = _text_of(tokenizer, prompt_ids, token_ids, skip)
        assert "".join(pieces) == detokenizer.output_text == expected, (trial, token_ids, pieces)
        # A stop string anywhere in that text cuts it there, however the tokens split it.
        stop = expected[(start := rng.randrange(len(expected))) : start + rng.randint(1, 3)] if expected else "zz"
        stopped = IncrementalDetokenizer(tokenizer, prompt_ids, stop=[stop], skip_special_tokens=skip)
        for token_id in token_ids:
            if (update := stopped.add_token(token_id)).stop_string is not None:
                break
        else:
            update = stopped.finish()
        assert stopped.output_text == (expected[: expected.find(stop)] if stop in expected else expected)
        assert update.stop_string == (stop if stop in expected else None)


def test_a_bad_byte_rewrites_nothing_already_streamed() -> None:
    # Byte fallback decodes this whole run as U+FFFDs; streamed, 你好 was out before the bad byte.
    tokenizer = sentencepiece_bpe()
    byte_ids = _byte_token_ids(tokenizer)
    token_ids = [byte_ids[byte] for byte in "你好".encode() + b"\xe4" + "世界".encode()]
    token_ids += tokenizer.encode(" the fox", add_special_tokens=False)
    assert tokenizer.decode(token_ids).startswith("\ufffd" * 13)
    pieces = stream(tokenizer, token_ids)
    assert "".join(pieces) == "你好\ufffd世界 the fox"
    assert pieces[: pieces.index("\ufffd")] == ["", "", "你", "", "", "好", ""]


def test_a_real_replacement_character_is_not_held(tokenizer: PreTrainedTokenizerBase) -> None:
    byte_ids = _byte_token_ids(tokenizer)
    token_ids = [byte_ids[byte] for byte in "a\ufffd".encode()]
    assert stream(tokenizer, token_ids)[-2:] == ["", "\ufffd"]


def test_the_end_releases_an_unfinished_character_and_the_stop_string_it_completes(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    byte_ids = _byte_token_ids(tokenizer)
    token_ids = [byte_ids[byte] for byte in b"ab\xe4\xb8"]
    detokenizer = IncrementalDetokenizer(tokenizer, stop=["b\ufffd"])
    updates = [detokenizer.add_token(token_id) for token_id in token_ids]
    assert "".join(update.text for update in updates) == "a"
    assert all(update.stop_string is None for update in updates)
    update = detokenizer.finish()
    assert (update.text, update.stop_string, detokenizer.output_text) == ("", "b\ufffd", "a")


def test_a_token_that_ends_the_sequence_completes_no_stop_string(tokenizer: PreTrainedTokenizerBase) -> None:
    # As in vLLM: an EOS or stop token kept in the text is the reason the sequence ended.
    params = SamplingParams(stop=["</", "<|"], skip_special_tokens=False, include_stop_str_in_output=True)
    detokenizer = IncrementalDetokenizer.for_request(tokenizer, [], params)
    hello = [detokenizer.add_token(token_id) for token_id in tokenizer.encode("hello", add_special_tokens=False)]
    eos = detokenizer.add_token(tokenizer.eos_token_id, ends_sequence=True)
    end = detokenizer.finish()
    assert [update.stop_string for update in [*hello, eos, end]] == [None] * (len(hello) + 2)
    assert detokenizer.output_text == "hello" + tokenizer.eos_token


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
    update = detokenizer.finish()
    pieces.append(update.text)
    return pieces, update.stop_string, len(token_ids)


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

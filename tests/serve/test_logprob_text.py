"""How logprobs place tokens in the text: completions' ``text_offset`` and chat's ``bytes``."""

from __future__ import annotations

from typing import Any

import pytest
from tokenizers import processors
from transformers import PreTrainedTokenizerBase

from neuron_llm.detokenizer import IncrementalDetokenizer, TokenTexts
from neuron_llm.outputs import Logprob
from neuron_llm.serve.logprobs import TextOffsets, chat_logprobs, completion_logprobs, prompt_text_offsets, token_name
from tests.tokenizer_kinds import TEXTS, byte_level_bpe, sentencepiece_bpe, stream


@pytest.mark.parametrize("text", TEXTS)
def test_each_token_begins_at_the_character_holding_its_first_byte(
    tokenizer: PreTrainedTokenizerBase,
    text: str,
) -> None:
    prompt_ids = tokenizer.encode("say:", add_special_tokens=False)
    token_ids = tokenizer.encode(text, add_special_tokens=False)
    texts = TokenTexts(tokenizer)
    streamed = "".join(stream(tokenizer, token_ids, prompt_ids))
    offsets = TextOffsets(texts, context_token_ids=prompt_ids)
    # Offsets are fixed as tokens arrive: in chunks of any size they are the same.
    starts = offsets(token_ids[:3]) + offsets(token_ids[3:4]) + offsets(token_ids[4:])
    bytes_before = 0
    for token_id, start in zip(token_ids, starts):
        assert len(streamed[:start].encode()) <= bytes_before < len(streamed[: start + 1].encode())
        bytes_before += len(texts.raw_bytes(token_id))


def test_a_byte_that_is_no_character_takes_a_place_of_its_own() -> None:
    tokenizer = byte_level_bpe()
    texts = TokenTexts(tokenizer)
    by_byte = {texts.raw_bytes(token_id): token_id for token_id in range(len(tokenizer))}
    # 中 is E4 B8 AD; a lone E4 before "=" decodes as U+FFFD, so "=" begins one place on.
    token_ids = [by_byte[bytes([byte])] for byte in b"\xe4\xb8\xad=\xe4="]
    assert tokenizer.decode(token_ids) == "中=\ufffd="
    assert TextOffsets(texts, start=7)(token_ids) == [7, 7, 7, 8, 9, 10]


def test_skipped_special_tokens_take_no_place() -> None:
    tokenizer = byte_level_bpe()
    texts = TokenTexts(tokenizer)
    hello, fox = tokenizer.encode("hello", add_special_tokens=False), tokenizer.encode(" fox", add_special_tokens=False)
    token_ids = [*hello, tokenizer.eos_token_id, *fox]
    skipped = TextOffsets(texts)(token_ids)
    kept = TextOffsets(texts, skip_special_tokens=False)(token_ids)
    assert skipped[len(hello)] == skipped[len(hello) + 1] == len("hello")
    assert kept[-len(fox)] == len("hello" + tokenizer.eos_token)


def test_prompt_offsets_place_each_token_in_the_prompt() -> None:
    tokenizer = sentencepiece_bpe()
    texts = TokenTexts(tokenizer)
    text = "the fox, 世界"
    # As encoded (a BOS the text does not hold begins at 0), and as sent in ids the text does
    # not encode to (世 spelled by its bytes), whose decoding drops SentencePiece's first space.
    encoded = tokenizer.encode(text)
    spelled = tokenizer.encode("the fox,", add_special_tokens=False) + [
        tokenizer.convert_tokens_to_ids(f"<0x{byte:02X}>") for byte in " 世界".encode()
    ]
    assert tokenizer.decode(spelled) == text and tokenizer.encode(text, add_special_tokens=False) != spelled
    for token_ids in (encoded, spelled):
        starts = prompt_text_offsets(texts, tokenizer, text, token_ids)
        words = [
            (texts(token_id), start)
            for token_id, start in zip(token_ids, starts)
            if texts(token_id).strip() and "\ufffd" not in texts(token_id) and not texts.is_special(token_id)
        ]
        assert len(words) >= 3 and all(text[start:].lstrip().startswith(word) for word, start in words)
        assert starts == sorted(starts) and starts[-1] == text.index("界")


def test_chat_bytes_of_a_split_character_join_into_it(tokenizer: PreTrainedTokenizerBase) -> None:
    token_ids = tokenizer.encode("世界 😀", add_special_tokens=False)
    entries = [{token_id: Logprob(-0.5, 1)} for token_id in token_ids]
    content = chat_logprobs(TokenTexts(tokenizer), token_ids, entries, num_top=1).content
    assert any(entry.token.startswith("bytes:\\x") for entry in content)  # split characters are there to join
    assert b"".join(bytes(entry.bytes) for entry in content).decode().lstrip() == "世界 😀"
    assert all(entry.bytes == entry.top_logprobs[0].bytes for entry in content)


def test_tokens_are_named_by_their_bytes_so_top_logprobs_keep_every_one(tokenizer: PreTrainedTokenizerBase) -> None:
    texts = TokenTexts(tokenizer)
    token_ids = tokenizer.encode("世界 😀", add_special_tokens=False)
    partial = [t for t in token_ids if "\ufffd" in tokenizer.decode([t])]
    assert len(partial) >= 2  # decoded alone these all read U+FFFD
    names = [token_name(texts, t) for t in partial]
    assert len(set(names)) == len(set(partial)) and all(name.startswith("bytes:\\x") for name in names)
    assert names[0] == "bytes:" + "".join(f"\\x{byte:02x}" for byte in texts.raw_bytes(partial[0]))
    # Every candidate keeps its own entry, and the sampled token its own value.
    entry = {t: Logprob(-1.0 - i, i + 1) for i, t in enumerate(partial)}
    sampled = partial[-1]
    result = completion_logprobs(texts, [sampled], [entry], [0])
    assert len(result.top_logprobs[0]) == len(set(partial))
    assert result.top_logprobs[0][token_name(texts, sampled)] == result.token_logprobs[0] == entry[sampled].logprob


def test_sentencepiece_tokens_keep_their_leading_space() -> None:
    tokenizer = sentencepiece_bpe()
    texts = TokenTexts(tokenizer)
    spaced, bare = tokenizer.convert_tokens_to_ids(["▁the", "the"])
    assert tokenizer.decode([spaced]) == tokenizer.decode([bare]) == "the"
    assert (token_name(texts, spaced), token_name(texts, bare)) == (" the", "the")


@pytest.mark.parametrize("make_tokenizer", [byte_level_bpe, sentencepiece_bpe])
@pytest.mark.parametrize("split", [1, 2, 3])
def test_a_prompt_ending_inside_a_character_moves_no_offset(split: int, make_tokenizer: Any) -> None:
    """The detokenizer's text holds a character begun in the prompt and ended in the output in
    neither part; the output's offsets must not count it either. Byte fallback decodes a prompt
    ending on 😀's first bytes, after 世's, as one U+FFFD a byte: none of 世 may be lost."""
    tokenizer = make_tokenizer()
    texts = TokenTexts(tokenizer)
    by_byte = {texts.raw_bytes(token_id): token_id for token_id in range(len(tokenizer))}
    spelled = [by_byte[bytes([byte])] for byte in "世😀".encode()]
    head = tokenizer.encode("the fox ", add_special_tokens=False) + spelled[:3]
    emoji = spelled[3:]
    prompt = head + emoji[:split]
    output = emoji[split:] + tokenizer.encode("= the fox", add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer, prompt)
    text = "".join(detokenizer.add_token(token_id).text for token_id in output)
    assert text == tokenizer.decode(head + emoji + output[len(emoji) - split :])[len(tokenizer.decode(head)) + 1 :]
    starts = TextOffsets(texts, context_token_ids=prompt)(output)
    assert starts[: len(emoji) - split + 1] == [0] * (len(emoji) - split + 1)
    names = [(token_name(texts, t), start) for t, start in zip(output, starts)]
    whole = [(name, start) for name, start in names if not name.startswith("bytes:")]
    assert len(whole) >= 3 and all(text[start : start + len(name)] == name for name, start in whole)


def test_output_offsets_after_a_prompt_of_no_text_drop_the_space_the_text_drops() -> None:
    # A SentencePiece decoder strips the leading space of a text; after a BOS-only prompt the
    # output's first token "▁hello" begins the text as "hello".
    tokenizer = sentencepiece_bpe()
    texts = TokenTexts(tokenizer)
    prompt = [tokenizer.bos_token_id]
    output = tokenizer.encode("hello world, the fox", add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer, prompt)
    text = "".join(detokenizer.add_token(token_id).text for token_id in output)
    assert text == "hello world, the fox"
    expected = [len(tokenizer.decode(prompt + output[:k], skip_special_tokens=True)) for k in range(len(output))]
    assert TextOffsets(texts, context_token_ids=prompt)(output) == expected


def test_prompt_offsets_include_the_space_a_tokenizer_trims_from_its_offsets() -> None:
    tokenizer = byte_level_bpe()
    tokenizer.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)  # GPT-2's
    texts = TokenTexts(tokenizer)
    text = "hello world, the fox"
    token_ids = tokenizer.encode(text)
    assert prompt_text_offsets(texts, tokenizer, text, token_ids) == TextOffsets(texts)(token_ids)
    the = token_ids.index(tokenizer.convert_tokens_to_ids("Ġthe"))
    assert prompt_text_offsets(texts, tokenizer, text, token_ids)[the] == text.index(" the")

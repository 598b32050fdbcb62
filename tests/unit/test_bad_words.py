"""How bad words become token ids, with each kind of tokenizer."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from neuron_llm.loader.tokenizer import bad_word_token_ids


def test_a_bad_word_is_spelled_as_it_starts_a_text_and_as_it_follows_a_word(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    for word in ("fox", " quick brown", "café"):
        spellings = bad_word_token_ids(tokenizer, [word])
        bare = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        assert spellings[0] == bare
        # Generated mid-text, the word's tokens are those of the text with it after a space.
        in_text = tokenizer.encode("the " + word.lstrip(), add_special_tokens=False)
        assert any(in_text[-len(spelling) :] == spelling for spelling in spellings), (word, spellings, in_text)
        assert len(spellings) <= 2 and all(spellings)

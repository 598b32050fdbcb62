"""Tokenizers read once per state of their files, and each caller's its own."""

from __future__ import annotations

import os
from pathlib import Path

from neuron_llm.loader.tokenizer import load_dir_tokenizer
from tests.tokenizer_kinds import byte_level_bpe, sentencepiece_bpe

TEXT = "the quick brown fox"


def test_each_load_is_a_copy_of_its_own(tmp_path: Path) -> None:
    byte_level_bpe().save_pretrained(tmp_path)
    first, second = load_dir_tokenizer(tmp_path), load_dir_tokenizer(tmp_path)
    assert first is not second and first.encode(TEXT) == second.encode(TEXT)
    first.chat_template = "{{ 'changed' }}"
    assert second.chat_template != first.chat_template


def test_a_tokenizer_replaced_on_disk_is_read_again(tmp_path: Path) -> None:
    old, new = byte_level_bpe(), sentencepiece_bpe()
    old.save_pretrained(tmp_path)
    assert load_dir_tokenizer(tmp_path).encode(TEXT) == old.encode(TEXT)
    for name in os.listdir(tmp_path):
        os.remove(tmp_path / name)
    new.save_pretrained(tmp_path)
    assert old.encode(TEXT) != new.encode(TEXT)
    assert load_dir_tokenizer(tmp_path).encode(TEXT) == new.encode(TEXT)

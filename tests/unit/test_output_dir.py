"""Directories written whole: the current directory and a link to a directory are outputs too."""

from __future__ import annotations

from pathlib import Path

import pytest

from neuron_llm.output_dir import written_whole


def test_the_current_directory_is_written_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(out)
    with written_whole(Path("."), "writing") as building:
        (building / "config.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "no hidden directory is left beside it"


def test_a_link_to_an_empty_directory_is_written_through(tmp_path: Path) -> None:
    target = tmp_path / "big-disk" / "out"
    target.mkdir(parents=True)
    link = tmp_path / "out"
    link.symlink_to(target)
    with written_whole(link, "writing") as building:
        (building / "config.json").write_text("{}")
    assert link.is_symlink() and (link / "config.json").read_text() == "{}"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out"]


def test_a_failed_write_leaves_the_directory_as_it_was(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt), written_whole(out, "writing") as building:
        (building / "config.json").write_text("{}")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []

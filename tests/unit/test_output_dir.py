"""Directories written whole: a new one is renamed into place; an existing empty one (the
current directory, a link to a directory) is kept and filled, its loadable file last."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from neuron_llm import output_dir
from neuron_llm.output_dir import written_whole


def write_checkpoint(building: Path) -> None:
    (building / "weights").mkdir()
    (building / "weights" / "model.safetensors").write_bytes(b"w")
    (building / "config.json").write_text("{}")
    (building / "tokenizer.json").write_text("{}")


def test_the_current_directory_is_filled_and_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    out.mkdir()
    inode = out.stat().st_ino
    monkeypatch.chdir(out)
    with written_whole(Path("."), "writing", last="config.json") as building:
        write_checkpoint(building)
    # The caller's working directory is still the output, not a removed directory.
    assert sorted(os.listdir(".")) == ["config.json", "tokenizer.json", "weights"]
    assert out.stat().st_ino == inode and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_link_to_an_empty_directory_is_written_through(tmp_path: Path) -> None:
    target = tmp_path / "big-disk" / "out"
    target.mkdir(parents=True)
    link = tmp_path / "out"
    link.symlink_to(target)
    with written_whole(link, "writing", last="config.json") as building:
        write_checkpoint(building)
    assert link.is_symlink() and (target / "config.json").is_file()
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "tokenizer.json", "weights"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["out"]


def test_the_loadable_file_is_moved_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    moves = []
    replace = os.replace
    monkeypatch.setattr(output_dir.os, "replace", lambda a, b: (moves.append(Path(b).name), replace(a, b)))
    (tmp_path / "out").mkdir()
    with written_whole(tmp_path / "out", "writing", last="config.json") as building:
        write_checkpoint(building)
    assert sorted(moves[:-1]) == ["tokenizer.json", "weights"] and moves[-1] == "config.json"


@pytest.mark.parametrize("exists", [False, True])
def test_an_interrupted_write_leaves_the_directory_as_it_was(
    exists: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    if exists:
        out.mkdir()
        # Interrupted between moves: the entries moved already go too.
        replace = os.replace
        calls = []

        def interrupted_second_move(source: str, destination: str) -> None:
            calls.append(destination)
            if len(calls) == 2:
                raise KeyboardInterrupt
            replace(source, destination)

        monkeypatch.setattr(output_dir.os, "replace", interrupted_second_move)
        with pytest.raises(KeyboardInterrupt), written_whole(out, "writing", last="config.json") as building:
            write_checkpoint(building)
        assert list(out.iterdir()) == []
    else:
        with pytest.raises(KeyboardInterrupt), written_whole(out, "writing", last="config.json") as building:
            write_checkpoint(building)
            raise KeyboardInterrupt
        assert list(tmp_path.iterdir()) == []


def test_a_directory_holding_files_is_refused(tmp_path: Path) -> None:
    (tmp_path / "kept.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not an empty directory"), written_whole(tmp_path, "writing", last="x"):
        pass
    assert [p.name for p in tmp_path.iterdir()] == ["kept.txt"]


def test_a_failed_write_removes_the_parents_it_made(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), written_whole(tmp_path / "a" / "b" / "out", "writing", last="x"):
        raise RuntimeError("the build failed")
    assert list(tmp_path.iterdir()) == []


def test_a_place_that_cannot_be_written_is_named(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    out = tmp_path / "a-file" / "out"
    with pytest.raises(ValueError, match=rf"^{out} cannot be written"), written_whole(out, "writing", last="x"):
        pass
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"]


def test_compile_checks_its_out_directory_before_anything_else(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from neuron_llm.cli import main

    (tmp_path / "a-file").write_text("")
    assert main(["compile", "--out", str(tmp_path / "a-file" / "art"), "--max-model-len", "0"]) == 2
    assert "a-file is a file, so no directory can be made under it" in capsys.readouterr().err
    assert main(["compile", "--out", str(tmp_path / "new" / "art"), "--max-model-len", "100000000"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


@pytest.mark.parametrize("in_place", [False, True])
def test_a_terminated_write_leaves_nothing_and_a_leftover_is_named(
    tmp_path: Path, in_place: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGTERM (docker stop, timeout) cleans up as Ctrl-C does; SIGKILL cannot, and the hidden
    directory it leaves in an existing --out is named when a retry is refused, and one left
    beside a new --out in a warning."""
    out = tmp_path / "out"
    if in_place:
        out.mkdir()
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from neuron_llm.output_dir import written_whole\n"
        "with written_whole(Path(sys.argv[1]), 'compiling', last='config.json') as building:\n"
        "    (building / 'weights').write_bytes(b'w')\n"
        "    print('written', flush=True)\n"
        "    time.sleep(60)\n"
    )
    for sig in (signal.SIGTERM, signal.SIGKILL):
        process = subprocess.Popen([sys.executable, "-c", script, str(out)], stdout=subprocess.PIPE, text=True)
        assert process.stdout is not None and process.stdout.readline() == "written\n"
        process.send_signal(sig)
        assert process.wait(timeout=30) == (143 if sig == signal.SIGTERM else -signal.SIGKILL)
        left = sorted(path.name for path in tmp_path.rglob(".out.compiling-*"))
        if sig == signal.SIGTERM:
            assert left == [] and out.exists() == in_place
    assert len(left) == 1
    if in_place:
        with pytest.raises(ValueError, match=rf"--out {out} is not empty \(it holds {left[0]}, left by an interrupted"):
            output_dir.check_out_dir(out)
    else:  # beside it, the leftover stops nothing; its bytes are named
        with caplog.at_level(logging.WARNING, logger="neuron_llm.output_dir"):
            output_dir.check_out_dir(out)
        assert f"{left[0]} was left by an interrupted run" in caplog.text

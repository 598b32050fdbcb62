"""Directories written whole: an interrupted write leaves nothing that loads."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)


@contextmanager
def written_whole(out: Path, activity: str, last: str) -> Iterator[Path]:
    """A hidden directory to write into, whose files become ``out``'s when the block ends; it
    is removed when the block raises (Ctrl-C included). ``out`` must be absent or empty;
    ``activity`` names the hidden directory (``.NAME.ACTIVITY-XXXX``).

    An absent ``out`` is written beside it and renamed onto it. An existing one (the current
    directory, a mount point, a link to a directory elsewhere) is kept, not replaced: the
    hidden directory is made inside it and its entries are moved up, ``last`` (the file that
    makes the output loadable: config.json, manifest.json) last, so that an interrupted move
    leaves nothing that loads either.
    """
    out = Path(os.path.abspath(out))
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty directory; choose a new or empty one")
    in_place = out.exists()
    made = [] if in_place else [parent for parent in out.parents if not parent.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(prefix=_building_prefix(out, activity), dir=out if in_place else out.parent))
    except OSError as e:
        _remove_empty(made)
        raise ValueError(f"{out} cannot be written: {e.strerror}") from e
    umask = os.umask(0)
    os.umask(umask)
    building.chmod(0o777 & ~umask)  # mkdtemp's 0700 would outlive the rename
    moved: list[Path] = []
    try:
        with _terminate_as_exit():
            yield building
        if not in_place:
            os.replace(building, out)
            return
        for entry in sorted(building.iterdir(), key=lambda entry: entry.name == last):
            moved.append(out / entry.name)
            os.replace(entry, moved[-1])
        building.rmdir()
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        for path in moved:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        _remove_empty(made)
        raise


def _building_prefix(out: Path, activity: str) -> str:
    """The name of the hidden directory ``out`` is written in (``.NAME.ACTIVITY-``), before mkdtemp's suffix."""
    return f".{out.name}.{activity}-"


@contextmanager
def _terminate_as_exit() -> Iterator[None]:
    """Make SIGTERM (``docker stop``, ``timeout``, a scheduler) raise ``SystemExit(143)`` here, so
    that the block's cleanup runs as it does for Ctrl-C; by default the process would die at
    once and leave the hidden directory. Only where SIGTERM has its default action, and only
    on the main thread, the one Python runs signal handlers on."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def exit_on_terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, exit_on_terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _remove_empty(directories: list[Path]) -> None:
    """Remove ``directories`` (deepest first) that are still empty: the parents a failed write made."""
    for directory in directories:
        try:
            directory.rmdir()
        except OSError:
            return


def check_out_dir(out: Path) -> None:
    """Raise ``ValueError`` unless ``out`` is an empty directory, or one that can be made, to write."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; choose a new or empty directory")
    leftover_pattern = _building_prefix(Path(os.path.abspath(out)), "*") + "*"
    if out.exists() and any(out.iterdir()):
        leftovers = sorted(entry.name for entry in out.glob(leftover_pattern) if entry.is_dir())
        hint = f" (it holds {', '.join(leftovers)}, left by an interrupted run: remove it)" if leftovers else ""
        raise ValueError(f"--out {out} is not empty{hint}; choose a new or empty directory")
    existing = next(parent for parent in (out, *out.absolute().parents) if parent.exists())
    if not existing.is_dir():
        raise ValueError(f"--out {out}: {existing} is a file, so no directory can be made under it")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {existing} is not writable")
    if not out.exists() and out.parent.is_dir():
        # Written beside --out, where a killed run's leftover does not stop a retry: only its bytes stay.
        for leftover in sorted(entry for entry in out.parent.glob(leftover_pattern) if entry.is_dir()):
            logger.warning(
                "%s was left by an interrupted run (or one still going); remove it to free its space", leftover
            )

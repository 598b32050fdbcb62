"""Directories written whole: an interrupted write leaves nothing that loads."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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
    if not in_place:
        out.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{out.name}.{activity}-", dir=out if in_place else out.parent))
    umask = os.umask(0)
    os.umask(umask)
    building.chmod(0o777 & ~umask)  # mkdtemp's 0700 would outlive the rename
    moved: list[Path] = []
    try:
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
        raise

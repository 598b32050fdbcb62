"""Directories written whole: an interrupted write leaves nothing that loads."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def written_whole(out: Path, activity: str) -> Iterator[Path]:
    """A hidden directory beside ``out`` to write into, renamed onto ``out`` when the block
    ends, removed when it raises (Ctrl-C included). ``out`` must be absent or empty;
    ``activity`` names the hidden directory (``.NAME.ACTIVITY-XXXX``). A symbolic link is
    written through: the directory it names becomes the output."""
    out = Path(os.path.realpath(out))  # "." has no name to hide a sibling by; a link cannot be rmdir'd
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty directory; choose a new or empty one")
    out.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{out.name}.{activity}-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    building.chmod(0o777 & ~umask)  # mkdtemp's 0700 would outlive the rename
    try:
        yield building
        if out.exists():
            out.rmdir()  # os.replace cannot replace a directory, even an empty one
        os.replace(building, out)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise

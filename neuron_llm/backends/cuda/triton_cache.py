"""Triton's kernel cache, made relocatable so that a compiled artifact can be copied elsewhere.

Triton records the files of one compiled kernel in a group file that names them by absolute
path; once the cache directory moves, those paths are gone and every kernel compiles again.
A group's files always live in the group's own key directory, so this manager looks them up
there, wherever that directory now is. Selected with ``TRITON_CACHE_MANAGER=`` ``MANAGER``.
"""

from __future__ import annotations

import json
import os

from triton.runtime.cache import FileCacheManager

MANAGER = f"{__name__}:RelocatableCacheManager"


class RelocatableCacheManager(FileCacheManager):
    def get_group(self, filename: str) -> dict[str, str] | None:
        group_file = f"__grp__{filename}"
        if not self.has_file(group_file):
            return None
        with open(self._make_path(group_file)) as f:
            children = json.load(f).get("child_paths")
        if children is None:
            return None
        here = {name: self._make_path(os.path.basename(path)) for name, path in children.items()}
        return {name: path for name, path in here.items() if os.path.exists(path)}

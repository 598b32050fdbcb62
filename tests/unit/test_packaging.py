"""The wheel holds every package of the source tree (an editable install would hide one left out)."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the package supports 3.10

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_of_the_tree_is_listed_for_the_wheel() -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    roots = {name: name for name in listed if "." not in name} | setuptools["package-dir"]
    in_tree = {
        ".".join((name, *init.parent.relative_to(ROOT / directory).parts))
        for name, directory in roots.items()
        for init in (ROOT / directory).rglob("__init__.py")
    }
    assert in_tree == listed

"""benchmarks/quant_quality.py refuses bad options before its minutes of baseline scoring."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "quant_quality.py"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--formats", "int8, nf4"], "--formats: unknown format 'nf4'; known: int8,"),
        (["--formats", "w8a8-sq1.5"], "w8a8-sq1.5: name a migration strength in [0, 1]"),
        (["--new-tokens", "0"], "--new-tokens=0: must be at least 1"),
        (["--calibration-tokens", "-1"], "--calibration-tokens=-1: must be at least 1"),
        (["--dtype", "int3"], "int3"),
    ],
)
def test_bad_options_are_refused_before_the_model_loads(options: list[str], message: str) -> None:
    # A model path that does not exist: reaching the load would be a different error.
    command = [sys.executable, str(SCRIPT), "--model", "/nonexistent/model", *options]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert message in result.stderr and "does not exist" not in result.stderr

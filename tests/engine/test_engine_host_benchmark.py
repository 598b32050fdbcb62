"""benchmarks/engine_host.py times the engine alone, over a worker that answers at once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "engine_host.py"


def test_the_benchmark_runs_every_output_kind() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--batches", "2", "--max-tokens", "20"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 2 |")]
    assert [row.split("|")[2].strip() for row in rows] == ["cumulative", "delta", "final_only"]

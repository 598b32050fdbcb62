"""benchmarks/scheduler_proposals.py times the scheduler alone, in cases that must hold still."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "scheduler_proposals.py"


def test_the_benchmark_keeps_its_requests_running_and_waiting(tmp_path: Path) -> None:
    # The script refuses a case in which a request was preempted or the waiting one admitted.
    command = [sys.executable, str(SCRIPT), "--running", "3,9", "--prefix", "64", "--steps", "4"]
    result = subprocess.run(
        [*command, "--json", str(tmp_path / "rows.json")], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [(row["running"], row["waiting"]) for row in rows] == [(3, False), (3, True), (9, False), (9, True)]
    assert all(row["with_ms"] > 0 and row["without_ms"] > 0 for row in rows)

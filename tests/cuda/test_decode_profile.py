"""``benchmarks/decode_profile.py``'s summaries, on kernel timelines made up here (the profile itself needs a GPU)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "decode_profile.py"


@pytest.fixture
def decode_profile(monkeypatch: pytest.MonkeyPatch) -> object:
    spec = importlib.util.spec_from_file_location("decode_profile", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "decode_profile", module)
    spec.loader.exec_module(module)
    return module


def test_a_step_is_summarized_and_tabled_beside_its_floor(decode_profile: object) -> None:
    # Two norms around a matmul, with gaps of 1 and 2 us: span 20, busy 17.
    kernels = [("rms_norm", 0.0, 2.0), ("gemv", 3.0, 15.0), ("rms_norm", 17.0, 20.0)]
    summary = decode_profile.summarize(kernels)
    assert (summary["span_us"], summary["busy_us"], summary["idle_us"], summary["num_kernels"]) == (20, 17, 3, 3)
    assert summary["kernels"] == [
        {"name": "gemv", "count": 1, "total_us": 12.0},
        {"name": "rms_norm", "count": 2, "total_us": 5.0},
    ]
    results = {
        "copy_bandwidth_Bps": 4.2e12,
        "context": 192,
        "bf16": {**summary, "wall_us": 25.0, "floor_us": 10.0},
    }
    table = decode_profile.markdown_table(results, ["bf16"], top=1)
    assert "| bf16 | 25 | 10 | 2.50x | 20 | 17 | 3 |" in table
    assert "| bf16 | gemv | 1 | 12.0 |" in table
    assert "rms_norm" not in table  # past the top 1

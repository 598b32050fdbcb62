"""``benchmarks/serve_load.py`` runs against a live server and reports what it measured."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from tests.serve.conftest import ServerThread

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "serve_load.py"


def test_serve_load_reports_throughput_latencies_and_errors(
    server: ServerThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = importlib.util.spec_from_file_location("serve_load", BENCHMARK)
    assert spec is not None and spec.loader is not None
    serve_load = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "serve_load", serve_load)  # dataclasses look their module up
    spec.loader.exec_module(serve_load)
    data = tmp_path / "wiki.txt"
    data.write_text(
        " = Title = \n\n The quick brown fox jumps over the lazy dog .\n Hello world , how are you ?\n A b c d e\n"
    )
    out = tmp_path / "report.json"
    argv = ["--url", server.url, "--rate", "50", "--num-requests", "6", "--data", str(data)]
    report = serve_load.main(
        [*argv, "--max-output-tokens", "8", "--json", str(out), "--markdown", str(tmp_path / "r.md")]
    )
    summary = json.loads(out.read_text())["summary"]
    assert summary == report["summary"]
    assert summary["num_completed"] == 6 and summary["errors"] == {}
    assert 4 * 6 <= summary["output_tokens"] <= 8 * 6  # each output length drawn in [4, 8], EOS ignored
    assert summary["ttft_ms"]["p50"] > 0 and summary["itl_ms"]["p99"] >= summary["itl_ms"]["p50"]
    assert "| TTFT |" in (tmp_path / "r.md").read_text()
    with pytest.raises(SystemExit, match="only a server on this machine"):
        serve_load.main(["--url", "http://10.0.0.1:8000", "--data", str(data)])

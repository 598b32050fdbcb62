"""``benchmarks/step_profile.py``'s summaries, on kernel timelines made up here (the profile itself needs a GPU)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_script(name: str, monkeypatch: pytest.MonkeyPatch) -> object:
    """``benchmarks/<name>.py`` as module ``name`` (importable by the scripts that import it)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def step_profile(monkeypatch: pytest.MonkeyPatch) -> object:
    return load_script("step_profile", monkeypatch)


def test_a_step_is_summarized_and_tabled_beside_its_floor(step_profile: object) -> None:
    # Two norms around a matmul, with gaps of 1 and 2 us: span 20, busy 17.
    kernels = [("rms_norm", 0.0, 2.0), ("gemv", 3.0, 15.0), ("rms_norm", 17.0, 20.0)]
    summary = step_profile.summarize(kernels)
    assert (summary["span_us"], summary["busy_us"], summary["idle_us"], summary["num_kernels"]) == (20, 17, 3, 3)
    assert summary["kernels"] == [
        {"name": "gemv", "count": 1, "total_us": 12.0},
        {"name": "rms_norm", "count": 2, "total_us": 5.0},
    ]
    results = {
        "copy_bandwidth_Bps": 4.2e12,
        "step": "decode at 192 tokens",
        "context": 192,
        "bf16": {**summary, "wall_us": 25.0, "floor_us": 10.0},
    }
    table = step_profile.markdown_table(results, ["bf16"], top=1)
    assert "| bf16 | 25 | 10 | 2.50x | 20 | 17 | 3 |" in table
    assert "| bf16 | gemv | 1 | 12.0 |" in table
    assert table.startswith("decode at 192 tokens")
    assert "rms_norm" not in table  # past the top 1


def test_an_alternated_format_keeps_each_run(step_profile: object) -> None:
    labels = step_profile.run_labels(["int8", "int8-cublas", "int8-cublas", "int8"])
    assert labels == ["int8", "int8-cublas", "int8-cublas (2)", "int8 (2)"]


def test_format_suffixes_name_the_choices_they_change(step_profile: object) -> None:
    assert step_profile.parse_format("int8") == ("int8", [])
    assert step_profile.parse_format("fp8-all-norm-apart") == ("fp8-all", ["-norm-apart"])
    assert step_profile.parse_format("bf16-cublas-norm-apart") == ("bf16", ["-cublas", "-norm-apart"])
    assert step_profile.parse_format("int8-skip-norms-skip-attention") == ("int8", ["-skip-norms", "-skip-attention"])
    for suffix, patch in step_profile.VARIANTS.items():
        with patch() as replacement:  # mock.patch.object refuses an attribute the module lacks
            assert replacement is not None, suffix


def test_prefill_floor_counts_the_decoder_linears(step_profile: object) -> None:
    import torch

    from neuron_llm.bench.engine import random_llama
    from neuron_llm.config import ModelConfig
    from neuron_llm.quant import quantize_model

    config = ModelConfig(
        vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
    )  # fmt: skip
    model = random_llama(config, torch.float32, "cpu")
    per_layer = 32 * (32 + 2 * 16) + 32 * 32 + 3 * 32 * 48  # q, k, v; o; gate, up, down
    assert step_profile.linear_flops_per_token(model) == 2 * 2 * per_layer
    quantize_model(model, "int8-g128")  # the scales are not weights
    assert step_profile.linear_flops_per_token(model) == 2 * 2 * per_layer


def test_bench_variant_runs_the_bench_under_its_suffixes(
    step_profile: object, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from neuron_llm import cli
    from neuron_llm.backends.cuda.backend import CudaBackend

    bench_variant = load_script("bench_variant", monkeypatch)
    committed = CudaBackend.rms_norm, CudaBackend.paged_attention
    seen = []

    def bench(argv: list[str]) -> int:
        seen.append((argv, CudaBackend.rms_norm, CudaBackend.paged_attention))
        return 0

    monkeypatch.setattr(cli, "main", bench)
    assert bench_variant.main(["-skip-norms-skip-attention", "--cases", "decode"]) == 0
    [(argv, rms_norm, paged_attention)] = seen
    assert argv == ["bench", "--cases", "decode"]
    assert rms_norm is step_profile._skip_norm and paged_attention is step_profile._skip_to_query
    assert (CudaBackend.rms_norm, CudaBackend.paged_attention) == committed  # restored after the bench
    assert "-skip-norms-skip-attention" in capsys.readouterr().out
    for bad in (["int8-skip-norms"], ["-skip-everything"], []):
        with pytest.raises(SystemExit, match="suffixes"):
            bench_variant.main(bad)

"""An artifact compiled on the XLA device holds each bucket's HLO, and loads only where it traces the same."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch_xla")

from neuron_llm import LLM, SamplingParams
from neuron_llm.cli import main
from neuron_llm.compile import build
from neuron_llm.compile.artifact import GRAPHS_DIR, HLO_DIR, Artifact, sealed, sha256_of
from neuron_llm.compile.build import compile_artifact
from neuron_llm.compile.hlo_export import MANIFEST_NAME as HLO_MANIFEST
from neuron_llm.xla import count_graphs

pytestmark = pytest.mark.xla

OPTIONS = {"max_model_len": 64, "max_num_seqs": 2, "max_num_batched_tokens": 32, "block_size": 4}
# Compiled in float32, as the CPU runs: a bf16 graph's greedy tokens may part from them at a near-tie.
XLA_OPTIONS = {**OPTIONS, "device": "xla", "dtype": "float32", "num_kv_blocks": 40}
PROMPTS = [{"prompt_token_ids": [1, 2, 3, 4, 5]}, {"prompt_token_ids": [7] * 9}]


def greedy_tokens(llm: LLM) -> list[list[int]]:
    try:
        outputs = llm.generate(PROMPTS, SamplingParams(max_tokens=8, temperature=0.0))
        return [list(output.outputs[0].token_ids) for output in outputs]
    finally:
        llm.shutdown()


@pytest.fixture
def compiled(save_tiny_llama: Callable[..., tuple[Any, Path]], tmp_path: Path) -> tuple[Path, Path]:
    _, source = save_tiny_llama()
    out = tmp_path / "artifact"
    compile_artifact(str(source), out, **XLA_OPTIONS)
    return source, out


def test_an_xla_artifact_holds_every_bucket_and_generates_what_the_cpu_does(compiled: tuple[Path, Path]) -> None:
    source, out = compiled
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["options"]["num_kv_blocks"] == 40
    assert "torch_xla" in manifest["system"]
    graphs = json.loads((out / GRAPHS_DIR / HLO_DIR / HLO_MANIFEST).read_text())["graphs"]
    assert sorted(graph["bucket"] for graph in graphs) == sorted(manifest["buckets"])
    assert all((out / GRAPHS_DIR / HLO_DIR / graph["file"]).is_file() for graph in graphs)
    expected = greedy_tokens(LLM(str(source), device="cpu", **OPTIONS))
    assert greedy_tokens(LLM(str(out))) == expected


@pytest.mark.parametrize("warm_up", [True, False])
def test_the_compiler_reads_the_artifacts_cache_for_the_llms_life(
    compiled: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, warm_up: bool
) -> None:
    # torch-neuronx reads NEURON_COMPILE_CACHE_URL as each graph compiles: lazily compiled
    # graphs (warm_up=False, or one first traced after warm-up) must find the artifact's NEFFs.
    from neuron_llm.xla import runner

    monkeypatch.delenv("NEURON_COMPILE_CACHE_URL", raising=False)
    seen = []
    sync = runner.sync
    monkeypatch.setattr(runner, "sync", lambda: (seen.append(os.environ.get("NEURON_COMPILE_CACHE_URL")), sync()))
    llm = LLM(str(compiled[1]), warm_up=warm_up)
    cache = os.environ.get("NEURON_COMPILE_CACHE_URL")
    assert cache is not None and Path(cache).name.startswith("neuron-llm-neff-")
    steps_before = len(seen)
    greedy_tokens(llm)  # shuts the LLM down
    assert len(seen) > steps_before and set(seen) == {cache}
    assert "NEURON_COMPILE_CACHE_URL" not in os.environ


def test_a_graph_the_artifact_lacks_is_named_when_it_compiles_while_serving(
    compiled: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # neuronx-cc writes a NEFF into the cache on a miss; the CPU's PJRT client writes none, so
    # here the compile writes one. Built lazily from the artifact (warm_up=False), a graph
    # found in its cache adds nothing and is not named.
    from neuron_llm.xla import runner

    greedy = SamplingParams(max_tokens=2, temperature=0.0)
    llm = LLM(str(compiled[1]), warm_up=False)
    try:
        with caplog.at_level(logging.WARNING, logger="neuron_llm.xla.runner"):
            llm.generate(PROMPTS, greedy)
        assert "the artifact lacks" not in caplog.text
        missed = Path(os.environ["NEURON_COMPILE_CACHE_URL"]) / "neuronxcc-0" / "MODULE_1+0" / "model.neff"
        count = runner.compile_count

        def compile_writing_a_neff() -> int:
            missed.parent.mkdir(parents=True, exist_ok=True)
            missed.write_bytes(b"neff")
            return count()

        monkeypatch.setattr(runner, "compile_count", compile_writing_a_neff)
        with caplog.at_level(logging.WARNING, logger="neuron_llm.xla.runner"):
            llm.generate(PROMPTS, replace(greedy, logprobs=1))  # its graph compiles now
    finally:
        llm.shutdown()
    assert "compiled 1 cache file(s) the artifact lacks" in caplog.text
    assert "neuronxcc-0/MODULE_1+0/model.neff" in caplog.text


def test_an_artifact_compiled_before_context_buckets_loads_with_one_width(compiled: tuple[Path, Path]) -> None:
    _, out = compiled
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["options"].pop("context_buckets") == []  # max_model_len 64: one width already
    manifest.pop("sha256")  # format 3, as then
    (out / "manifest.json").write_text(json.dumps({**manifest, "format_version": 3}))
    llm = LLM(str(out), warm_up=False)
    assert llm.engine.runner.buckets.block_table_widths == (16,)
    llm.shutdown()


def test_a_new_process_traces_the_graphs_the_artifact_holds(compiled: tuple[Path, Path]) -> None:
    # The Neuron cache finds a NEFF by its module's hash: the trace must not vary by process.
    source, out = compiled
    load = (
        "import json, sys; from neuron_llm import LLM, SamplingParams; llm = LLM(sys.argv[1]); "
        "outputs = llm.generate(json.loads(sys.argv[2]), SamplingParams(max_tokens=8, temperature=0.0)); "
        "print(json.dumps([list(o.outputs[0].token_ids) for o in outputs])); llm.shutdown()"
    )
    done = subprocess.run(
        [sys.executable, "-c", load, str(out), json.dumps(PROMPTS)], capture_output=True, text=True, check=True
    )
    assert json.loads(done.stdout.strip().splitlines()[-1]) == greedy_tokens(LLM(str(source), device="cpu", **OPTIONS))


def test_a_bucket_that_traces_another_graph_is_refused(compiled: tuple[Path, Path]) -> None:
    _, out = compiled
    path = out / GRAPHS_DIR / HLO_DIR / HLO_MANIFEST
    hlo = json.loads(path.read_text())
    hlo["graphs"][1]["sha256"] = "0" * 64
    path.write_text(json.dumps(hlo))
    with pytest.raises(ValueError, match=f"{HLO_MANIFEST}: .* bytes where the manifest recorded .*: damaged"):
        LLM(str(out))
    # As if compiled so elsewhere: the artifact's manifest records the edited HLO manifest.
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["graphs"][f"{HLO_DIR}/{HLO_MANIFEST}"] = {"bytes": path.stat().st_size, "sha256": sha256_of(path)}
    (out / "manifest.json").write_text(json.dumps(sealed(manifest)))
    with pytest.raises(ValueError, match=f"bucket {hlo['graphs'][1]['bucket']} traces to another graph"):
        LLM(str(out))


def test_a_damaged_graph_file_is_refused_at_load_or_by_verify(compiled: tuple[Path, Path]) -> None:
    _, out = compiled
    graph = next((out / GRAPHS_DIR / HLO_DIR).glob("*.hlo.pb"))
    data = graph.read_bytes()
    graph.write_bytes(data[:10])
    with pytest.raises(ValueError, match=f"{graph.name}: 10 bytes where the manifest recorded {len(data)}: damaged"):
        LLM(str(out))
    graph.write_bytes(bytes([data[0] ^ 1]) + data[1:])  # the same size
    with pytest.raises(ValueError, match=f"{graph.name}: its sha256 differs from the one compiled"):
        Artifact.open(out).verify()


def test_default_sampling_and_chosen_features_are_compiled_in_and_load_compiles_nothing(
    save_tiny_llama: Callable[..., tuple[Any, Path]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A generation_config.json with a repetition penalty makes every default request's steps
    use the penalties graph: compiled with the artifact, verification graphs included, and
    recorded with the features chosen."""
    _, source = save_tiny_llama()
    (source / "generation_config.json").write_text(json.dumps({"repetition_penalty": 1.1}))
    out = tmp_path / "features"
    options = {**XLA_OPTIONS, "max_num_batched_tokens": 16, "speculative_config": {"num_speculative_tokens": 2}}
    compile_artifact(str(source), out, sampling_features=["logprobs"], **options)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["options"]["sampling_features"] == ["logprobs", "penalties"]
    graphs = {
        graph["bucket"] for graph in json.loads((out / GRAPHS_DIR / HLO_DIR / HLO_MANIFEST).read_text())["graphs"]
    }
    prefill = [name for name in manifest["buckets"] if name.startswith("prefill")]
    plain = [*manifest["buckets"], *(f"{name}_verify" for name in prefill)]
    suffixes = ["", "+logprobs", "+penalties", "+logprobs+penalties"]
    assert graphs == {f"{name}{suffix}" for name in plain for suffix in suffixes}

    with pytest.raises(ValueError, match="sampling_features=.*compiled with sampling_features="):
        LLM(str(out), sampling_features=["min_tokens"])
    llm = LLM(str(out), sampling_features=["logprobs"])  # the default's penalties are implied
    warmed = llm.engine.stats().num_compiled_graphs
    greedy = {"temperature": 0.0, "max_tokens": 6, "logprobs": 1}
    assert llm.generation_defaults == {"repetition_penalty": 1.1}
    with caplog.at_level(logging.WARNING), count_graphs() as counts:
        outputs = llm.generate(PROMPTS, SamplingParams(**llm.generation_defaults, **greedy))
    assert counts.compilations == 0 and "compiled a new graph" not in caplog.text
    assert llm.engine.stats().num_compiled_graphs == warmed
    reference = LLM(str(source), device="cpu", speculative_config=options["speculative_config"], **OPTIONS)
    expected = reference.generate(PROMPTS, SamplingParams(**reference.generation_defaults, **greedy))
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in expected]
    llm.shutdown()
    reference.shutdown()

    # Loaded ignoring the defaults, the artifact's graphs of fewer features serve.
    LLM(str(out), sampling_features=["logprobs"], generation_config="vllm", warm_up=False).shutdown()

    # Compiled ignoring the defaults, the artifact's set stands when it loads with them.
    ignoring = tmp_path / "ignoring-defaults"
    compile_artifact(str(source), ignoring, generation_config="vllm", **XLA_OPTIONS)
    assert json.loads((ignoring / "manifest.json").read_text())["options"]["sampling_features"] == []
    loaded = LLM(str(ignoring))
    assert loaded.config.device.sampling_features == () and loaded.generation_defaults == {"repetition_penalty": 1.1}
    loaded.shutdown()


def test_context_buckets_are_compiled_in_and_fixed(
    save_tiny_llama: Callable[..., tuple[Any, Path]], tmp_path: Path
) -> None:
    _, source = save_tiny_llama()
    out = tmp_path / "contexts"
    options = [f"--{name.replace('_', '-')}={value}" for name, value in XLA_OPTIONS.items()]
    assert main(["compile", "--model", str(source), "--out", str(out), *options, "--context-buckets", "32"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["options"]["context_buckets"] == [32]
    graphs = {
        graph["bucket"] for graph in json.loads((out / GRAPHS_DIR / HLO_DIR / HLO_MANIFEST).read_text())["graphs"]
    }
    assert graphs == {f"{name}_c{context}" for name in manifest["buckets"] for context in (32, 64)}
    with pytest.raises(ValueError, match=r"context_buckets=\[16\], but .* compiled with context_buckets=\[32\]"):
        LLM(str(out), context_buckets=[16])
    LLM(str(out), context_buckets=[32, 64], warm_up=False).shutdown()  # max_model_len's own is implied
    llm = LLM(str(out))
    assert llm.engine.runner.buckets.block_table_widths == (8, 16)
    with count_graphs() as counts:  # every width's graphs were warmed up
        tokens = greedy_tokens(llm)
    assert counts.compilations == 0
    assert tokens == greedy_tokens(LLM(str(source), device="cpu", **OPTIONS))


def test_speculative_decoding_is_compiled_into_an_xla_artifact(
    save_tiny_llama: Callable[..., tuple[Any, Path]], tmp_path: Path
) -> None:
    """Each prefill bucket's verification graph is exported beside the plain ones and checked at
    load; the artifact speculates as compiled, and refuses another speculation, or none compiled."""
    _, source = save_tiny_llama()
    speculative = {"num_speculative_tokens": 2}
    out = tmp_path / "speculative"
    compile_artifact(str(source), out, speculative_config=speculative, **XLA_OPTIONS)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["options"]["speculative_config"] == {"num_speculative_tokens": 2}
    graphs = json.loads((out / GRAPHS_DIR / HLO_DIR / HLO_MANIFEST).read_text())["graphs"]
    prefill = [name for name in manifest["buckets"] if name.startswith("prefill")]
    verifying = {graph["bucket"]: graph for graph in graphs if graph["num_verified_rows"]}
    assert sorted(verifying) == sorted(f"{name}_verify" for name in prefill)
    # max_num_seqs=2, 2 proposals: buckets of 3 and 6 tokens for 1 and 2 decoding sequences, and
    # 6 rows (every sequence's proposals and the token after them) a bucket of more tokens.
    assert {name: graph["num_verified_rows"] for name, graph in verifying.items()} == {
        "prefill_t3_s1_verify": 3, "prefill_t6_s2_verify": 6, "prefill_t16_s2_verify": 6, "prefill_t32_s2_verify": 6
    }  # fmt: skip
    assert all(graph["inputs"]["proposals"]["shape"] == [graph["num_verified_rows"]] for graph in verifying.values())

    llm = LLM(str(out))
    assert llm.config.speculative is not None and llm.config.speculative.num_speculative_tokens == 2
    assert greedy_tokens(llm) == greedy_tokens(LLM(str(source), device="cpu", **OPTIONS))
    with pytest.raises(ValueError, match="speculative_config=.*compiled with speculative_config="):
        LLM(str(out), speculative_config={"num_speculative_tokens": 3})
    # The lookup lengths change no graph.
    other_lookup = LLM(str(out), speculative_config={"num_speculative_tokens": 2, "prompt_lookup_max": 2})
    assert other_lookup.config.speculative is not None and other_lookup.config.speculative.prompt_lookup_max == 2
    other_lookup.shutdown()

    plain = tmp_path / "plain"
    compile_artifact(str(source), plain, **XLA_OPTIONS)
    with pytest.raises(ValueError, match="was compiled with speculative_config=None"):
        LLM(str(plain), speculative_config=speculative)


def test_a_neuron_compile_is_refused_in_a_process_that_compiled_graphs(
    compiled: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On Neuron, graphs found in the process's memory are not compiled into the artifact's cache.
    source, _ = compiled
    monkeypatch.setattr(build, "writes_neuron_cache", lambda: True)
    with pytest.raises(ValueError, match="this process has compiled XLA graphs already: the NEFFs"):
        compile_artifact(str(source), tmp_path / "again", **XLA_OPTIONS)
    assert not (tmp_path / "again").exists()

"""An artifact compiled on the XLA device holds each bucket's HLO, and loads only where it traces the same."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch_xla")

from neuron_llm import LLM, SamplingParams
from neuron_llm.compile.artifact import GRAPHS_DIR, HLO_DIR
from neuron_llm.compile.build import compile_artifact
from neuron_llm.compile.hlo_export import MANIFEST_NAME as HLO_MANIFEST

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
    with pytest.raises(ValueError, match=f"bucket {hlo['graphs'][1]['bucket']} traces to another graph"):
        LLM(str(out))


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

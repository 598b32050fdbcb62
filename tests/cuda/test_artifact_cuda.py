"""A CUDA artifact carries Triton's compiled kernels: loaded elsewhere, in a new process, nothing compiles."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("triton")

from neuron_llm import LLM, SamplingParams
from neuron_llm.compile.artifact import GRAPHS_DIR, MANIFEST_NAME, TRITON_CACHE
from tests.conftest import build_hf_llama

pytestmark = pytest.mark.cuda

PROMPTS = [{"prompt_token_ids": [1, 2, 3, 4, 5]}, {"prompt_token_ids": [7] * 40}]
LOAD = """
import json, sys
from pathlib import Path
from neuron_llm import LLM, SamplingParams
from neuron_llm.compile.artifact import GRAPHS_DIR, cache_files
path = Path(sys.argv[1])
before = cache_files(path / GRAPHS_DIR)
llm = LLM(str(path))
assert cache_files(path / GRAPHS_DIR) == before, "the load wrote into the artifact"
added = llm.compiled_at_load
prompts = json.loads(sys.argv[2])
outputs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
print(json.dumps({"added": added, "tokens": [list(o.outputs[0].token_ids) for o in outputs]}))
llm.shutdown()
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("quantization", [None, "int8"])
def test_a_moved_artifact_loads_without_compiling_a_kernel(
    save_tiny_llama: Callable[..., tuple[Any, Path]], tmp_path: Path, quantization: str | None
) -> None:
    _, source = save_tiny_llama(hidden_size=256, intermediate_size=512, num_attention_heads=4)
    options = {"device": "cuda", "dtype": "bfloat16", "quantization": quantization, "max_model_len": 256}
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    built = tmp_path / "built"
    # In a new process, as the command runs: kernels a process compiled before stay in its
    # memory and would not be written to the artifact.
    command = [sys.executable, "-m", "neuron_llm.cli", "compile", "--model", str(source), "--out", str(built)]
    command += ["--device", "cuda", "--dtype", "bfloat16", "--max-model-len", "256"]
    command += ["--quantization", quantization] if quantization else []
    subprocess.run(command, capture_output=True, text=True, check=True)
    manifest = json.loads((built / MANIFEST_NAME).read_text())
    reference = LLM(str(source), **options)
    expected = [list(o.outputs[0].token_ids) for o in reference.generate(PROMPTS, params)]
    reference.shutdown()
    assert manifest["system"]["cuda_capability"] == "{}.{}".format(*torch.cuda.get_device_capability())
    assert any(name.startswith(f"{TRITON_CACHE}/") for name in manifest["graphs"])
    moved = tmp_path / "moved"
    shutil.move(built, moved)  # Triton's own cache would name files under `built` and miss them
    done = subprocess.run(
        [sys.executable, "-c", LOAD, str(moved), json.dumps(PROMPTS)], capture_output=True, text=True, check=True
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["added"] == []
    assert result["tokens"] == expected
    assert (moved / GRAPHS_DIR / TRITON_CACHE).is_dir()


DRAFT_LOAD = """
import json, os, sys
from pathlib import Path
from neuron_llm import LLM, SamplingParams
from neuron_llm.compile.artifact import cache_files
llm = LLM(sys.argv[1], speculative_config={"model": sys.argv[2], "num_speculative_tokens": 2})
private = [path for path in Path(os.environ["TMPDIR"]).iterdir() if path.name.startswith("neuron-llm-triton-")]
outputs = llm.generate(json.loads(sys.argv[3]), SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
print(json.dumps({
    "added": llm.compiled_at_load,
    "private": sum(len(cache_files(path)) for path in private),
    "drafted": llm.engine.stats().num_draft_tokens,
    "tokens": [list(o.outputs[0].token_ids) for o in outputs],
}))
llm.shutdown()
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_a_draft_models_kernels_are_not_taken_for_ones_the_artifact_lacked(
    save_tiny_llama: Callable[..., tuple[Any, Path]], tmp_path: Path
) -> None:
    _, source = save_tiny_llama(hidden_size=256, intermediate_size=512, num_attention_heads=4)
    # Another head size and width: the draft's kernels are ones the artifact never compiled.
    draft = build_hf_llama(hidden_size=96, intermediate_size=192, num_attention_heads=3, num_key_value_heads=1)
    draft.save_pretrained(tmp_path / "draft")
    built = tmp_path / "built"
    command = [sys.executable, "-m", "neuron_llm.cli", "compile", "--model", str(source), "--out", str(built)]
    subprocess.run(command + ["--device", "cuda", "--dtype", "bfloat16", "--max-model-len", "256"], check=True)
    reference = LLM(str(source), device="cuda", dtype="bfloat16", max_model_len=256)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    expected = [list(o.outputs[0].token_ids) for o in reference.generate(PROMPTS, params)]
    reference.shutdown()
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", DRAFT_LOAD, str(built), str(tmp_path / "draft"), json.dumps(PROMPTS)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "TMPDIR": str(temporary)},
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["added"] == []
    manifest = json.loads((built / MANIFEST_NAME).read_text())
    copied = sum(name.startswith(f"{TRITON_CACHE}/") for name in manifest["graphs"])
    assert result["private"] > copied, "the draft compiled no kernel of its own: the test shows nothing"
    assert result["drafted"] > 0
    assert result["tokens"] == expected

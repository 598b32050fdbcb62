"""Tensor parallelism on the XLA device: one process, weights and KV pools sharded by annotation
(``neuron_llm.xla.spmd``), each graph partitioned by XLA over the process's devices.

Each case runs in a process of its own with two CPU devices (``CPU_NUM_DEVICES``), since SPMD
and the device count are a process's settings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch_xla")

from neuron_llm import LLM, SamplingParams
from neuron_llm.config import DeviceConfig, EngineConfig, ModelConfig, ParallelConfig

pytestmark = pytest.mark.xla

CHILD = Path(__file__).with_name("tensor_parallel_child.py")
NUM_LAYERS = 2


def run_child(model: Path, tmp_path: Path, *args: str, devices: int = 2) -> subprocess.CompletedProcess:
    dump = tmp_path / "dump"
    env = {
        **os.environ,
        "PJRT_DEVICE": "CPU",
        "CPU_NUM_DEVICES": str(devices),
        "XLA_FLAGS": f"--xla_backend_optimization_level=0 --xla_dump_to={dump}",
    }
    return subprocess.run(
        [sys.executable, str(CHILD), str(model), str(dump), *args], env=env, capture_output=True, text=True, timeout=600
    )


def on_cpu(model: Path, quantization: str | None = None) -> LLM:
    from tests.xla.tensor_parallel_child import OPTIONS

    return LLM(str(model), device="cpu", quantization=quantization, **OPTIONS)


def cpu_tokens(model: Path, quantization: str | None = None) -> list[list[int]]:
    from tests.xla.tensor_parallel_child import PROMPTS

    outputs = on_cpu(model, quantization).generate(PROMPTS, SamplingParams(max_tokens=8, temperature=0.0))
    return [list(output.outputs[0].token_ids) for output in outputs]


@pytest.mark.parametrize("quantization", [None, "int8", "int8-head", "fp8-all", "w8a8"])
def test_two_devices_generate_what_one_cpu_does_with_megatrons_collectives(
    save_tiny_llama: Callable[..., tuple[Any, Path]], tmp_path: Path, quantization: str | None
) -> None:
    _, model = save_tiny_llama()
    done = run_child(model, tmp_path, *([quantization] if quantization else []))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["tokens"] == cpu_tokens(model, quantization)
    assert "torch-neuronx lists as not supported" not in done.stderr  # a warning for NeuronCores only
    assert result["compiled_after_warm_up"] == 0
    if quantization is None:
        # Each device holds half of every weight but the norms' (2 a layer and the last, fp32).
        norms = 4 * 64 * (2 * NUM_LAYERS + 1)
        assert result["weight_bytes"] == (on_cpu(model).weight_bytes - norms) // 2 + norms
    # Every step graph: the vocabulary-split embedding's all-reduce, the o and down projections'
    # all-reduces in each layer, and one all-gather of the logits rows (never a weight). W8A8
    # adds, before o and down, one of each token's activation maximum over their split inputs.
    assert result["collectives"], "no partitioned graph with collectives was dumped"
    per_token = 2 * NUM_LAYERS if quantization in ("fp8-all", "w8a8") else 0
    for graph in result["collectives"]:
        reduced = [shape for shape, kind in graph if kind == "all-reduce"]
        maxima = [shape for shape in reduced if shape.endswith("]{0}")]  # [tokens]
        assert len(reduced) - len(maxima) == 1 + 2 * NUM_LAYERS and len(maxima) == per_token, graph
        assert [kind for _, kind in graph].count("all-gather") == 1, graph
        gathered = next(shape for shape, kind in graph if kind == "all-gather")
        assert gathered.endswith("256]{0,1}") and int(gathered.split("[")[1].split(",")[0]) <= 32, gathered


def test_a_device_count_other_than_the_tp_degree_is_refused(
    save_tiny_llama: Callable[..., tuple[Any, Path]], tmp_path: Path
) -> None:
    _, model = save_tiny_llama()
    done = run_child(model, tmp_path, devices=4)
    assert done.returncode == 1
    assert "tensor_parallel_size=2 on the XLA device shards over every device this process sees, and it sees 4" in (
        done.stderr
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # Turning SPMD on after the device was used crashed torch-xla's next step (a segfault).
        (["--after-one-device"], "has used the XLA device without tensor parallelism already"),
        (["--after-device-call"], "has used the XLA device without tensor parallelism already"),
    ],
)
def test_what_the_partitioned_graphs_cannot_take_is_refused(
    save_tiny_llama: Callable[..., tuple[Any, Path]], tmp_path: Path, args: list[str], message: str
) -> None:
    _, model = save_tiny_llama()
    done = run_child(model, tmp_path, *args)
    assert done.returncode == 1 and message in done.stderr, done.stderr[-3000:]


def test_neuroncores_are_warned_that_torch_neuronx_does_not_support_gspmd() -> None:
    from neuron_llm.xla import spmd

    with pytest.warns(UserWarning, match="GSPMD, which torch-neuronx lists as not supported"):
        spmd.warn_if_unsupported("NEURON")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spmd.warn_if_unsupported("CPU")


def test_kv_heads_the_tp_degree_does_not_divide_are_refused() -> None:
    model = ModelConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 must divide num_key_value_heads=1 on the XLA"):
        EngineConfig(model=model, device=DeviceConfig(device="xla"), parallel=ParallelConfig(tensor_parallel_size=2))
    EngineConfig(model=model, device=DeviceConfig(device="cpu"), parallel=ParallelConfig(tensor_parallel_size=2))


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_an_artifact_compiled_with_tensor_parallelism_loads_in_a_new_process_and_generates_what_one_cpu_does(
    save_tiny_llama: Callable[..., tuple[Any, Path]], tmp_path: Path, quantization: str | None
) -> None:
    _, model = save_tiny_llama()
    artifact, args = tmp_path / "artifact", [quantization] if quantization else []
    compiled = run_child(model, tmp_path / "compiling", *args, f"--compile-to={artifact}")
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    hlo = json.loads(compiled.stdout.strip().splitlines()[-1])
    assert hlo["num_partitions"] == 2
    for graph in hlo["graphs"]:
        # The whole model's module, its weights and pools annotated with Megatron's split.
        assert graph["inputs"]["key_cache"]["shape"] == [40, 4, 2, 16]
        parameters = graph["entry_parameters"]
        splits = Counter(
            (shape, tuple(split) if split else None)
            for shape, split in zip(parameters["shapes"], parameters["splits"], strict=True)
        )
        assert splits[("f32[40,4,2,16]", (1, 1, 2, 1))] == 2 * NUM_LAYERS
        weight = "s8" if quantization else "f32"
        # Per layer gate and up (output features), down (input features); the vocabulary rows.
        assert splits[(f"{weight}[128,64]", (2, 1))] == 2 * NUM_LAYERS
        assert splits[(f"{weight}[64,128]", (1, 2))] == NUM_LAYERS
        assert splits[("f32[256,64]", (2, 1))] == 2
    loaded = run_child(artifact, tmp_path / "loading", *args)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert json.loads(loaded.stdout.strip().splitlines()[-1])["tokens"] == cpu_tokens(model, quantization)

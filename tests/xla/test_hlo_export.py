"""The HLO export writes one parseable module per bucket whose entry signature is the bucket's."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
import torch

torch_xla = pytest.importorskip("torch_xla")

from neuron_llm.compile import hlo_export
from neuron_llm.compile.hlo_export import GraphShape, dummy_step, export_hlo
from neuron_llm.config import (
    SAMPLING_FEATURES,
    CacheConfig,
    DeviceConfig,
    EngineConfig,
    ParallelConfig,
    SpeculativeConfig,
)
from neuron_llm.xla import HloShape, entry_parameter_shapes, entry_parameter_splits, hlo_module_proto, hlo_text

pytestmark = pytest.mark.xla

SHAPES = [GraphShape("decode_t4_s4", 4, 4, 8), GraphShape("prefill_t16_s2", 16, 2, 6)]
NUM_KV_BLOCKS = 20
BLOCK_SIZE = 4
_TORCH_DTYPE_TO_HLO = {
    "int64": "s64",
    "int32": "s32",
    "float32": "f32",
    "bfloat16": "bf16",
    "float16": "f16",
    "bool": "pred",
}


def declared_parameters(graph: dict) -> Counter[HloShape]:
    """The manifest's step inputs as HLO shapes, each as many times as the graph takes it."""
    counts: Counter[HloShape] = Counter()
    for spec in graph["inputs"].values():
        counts[HloShape(_TORCH_DTYPE_TO_HLO[spec["dtype"]], tuple(spec["shape"]))] += spec.get("count", 1)
    return counts


@pytest.fixture
def exported(tiny_llama, tmp_path):
    model = tiny_llama(96)
    config = EngineConfig(model=model.config, cache=CacheConfig(block_size=BLOCK_SIZE))
    manifest = export_hlo(model, config, SHAPES, tmp_path, num_kv_blocks=NUM_KV_BLOCKS)
    return model, manifest, tmp_path


def test_one_module_per_bucket_with_the_bucket_signature(exported) -> None:
    model, manifest, out = exported
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert [graph["bucket"] for graph in manifest["graphs"]] == [shape.name for shape in SHAPES]
    assert sorted(p.name for p in out.glob("*.hlo.pb")) == sorted(f"{s.name}.hlo.pb" for s in SHAPES)

    num_weights = len(list(model.parameters())) + len(list(model.buffers()))
    for graph, shape in zip(manifest["graphs"], SHAPES):
        parameters = entry_parameter_shapes((out / graph["file"]).read_bytes())
        assert graph["entry_parameters"] == {"count": len(parameters), "shapes": [str(p) for p in parameters]}
        # Traced without SPMD: no parameter carries a split.
        assert entry_parameter_splits((out / graph["file"]).read_bytes()) == [None] * len(parameters)
        # Every step input and both pools of each layer are graph parameters, with exactly their shapes.
        assert not declared_parameters(graph) - Counter(parameters)
        assert Counter(parameters)[HloShape("s32", (shape.num_seqs, shape.max_blocks_per_seq))] == 1
        assert Counter(parameters)[HloShape("f32", (NUM_KV_BLOCKS, BLOCK_SIZE, 2, 8))] == 4
        # The rest are the weights: no input was folded into a constant, and no Python number
        # is a parameter whose value the module does not hold.
        assert all(p.dims for p in parameters), [str(p) for p in parameters if not p.dims]
        assert len(parameters) == sum(declared_parameters(graph).values()) + num_weights
        assert graph["outputs"]["token_ids"] == {"shape": [shape.num_seqs], "dtype": "int64"}
        names = ["token_ids", "key_cache[0]", "value_cache[0]", "key_cache[1]", "value_cache[1]"]
        assert sorted(graph["outputs"]["order"]) == sorted(names)
    assert len({graph["sha256"] for graph in manifest["graphs"]}) == len(SHAPES)
    assert manifest["dtype"] == "float32" and manifest["quantization"] == [] and manifest["num_partitions"] == 1


def test_a_graph_of_sampling_features_declares_every_input_and_output(tiny_llama, tmp_path) -> None:
    """Each feature adds host-built inputs (bias, penalties, masks) or outputs (logprobs, prompt
    logits rows): the manifest names them all, for a plain and a verification graph alike."""
    shapes = [
        GraphShape("decode_t4_s4+all", 4, 4, 8, features=SAMPLING_FEATURES),
        GraphShape("prefill_t16_s2_verify+all", 16, 2, 6, num_verified_rows=6, features=SAMPLING_FEATURES),
        GraphShape("decode_t4_s4+logprobs", 4, 4, 8, features=("logprobs",)),
    ]
    model = tiny_llama(96)
    config = EngineConfig(
        model=model.config, cache=CacheConfig(block_size=BLOCK_SIZE), speculative=SpeculativeConfig(2)
    )
    manifest = export_hlo(model, config, shapes, tmp_path, num_kv_blocks=NUM_KV_BLOCKS)
    num_weights = len(list(model.parameters())) + len(list(model.buffers()))
    for graph, shape in zip(manifest["graphs"], shapes, strict=True):
        parameters = entry_parameter_shapes((tmp_path / graph["file"]).read_bytes())
        assert not declared_parameters(graph) - Counter(parameters), graph["bucket"]
        assert len(parameters) == sum(declared_parameters(graph).values()) + num_weights, graph["bucket"]
        assert graph["features"] == list(shape.features)
        outputs = graph["outputs"]
        rows = shape.num_sampling_rows
        assert outputs["token_ids"] == {"shape": [rows], "dtype": "int64"}
        assert outputs["logprobs.top_logprobs"]["shape"][0] == rows
        assert ("prompt_logits" in outputs) == ("prompt_logprobs" in shape.features)
        assert ("num_accepted" in outputs) == bool(shape.num_verified_rows)
        aliases = {name for name, spec in outputs.items() if "same_as" in spec}
        assert set(outputs["order"]) == {
            *outputs.keys() - {"order"} - aliases,
            *(f"{n}[{i}]" for n in ("key_cache", "value_cache") for i in range(2)),
        }
    assert manifest["graphs"][0]["outputs"]["prompt_logits"] == {"shape": [4, 96], "dtype": "float32"}


def test_proto_signature_agrees_with_hlo_text(exported, make_driver) -> None:
    """The wire-format reader and XLA's own HLO printer see the same entry parameters."""
    model, _, _ = exported
    driver = make_driver(model, [[1]], [(16, 2)], on_xla=True)
    logits = driver.worker.trace(dummy_step(SHAPES[1]))
    tensors = [logits, *(pool for layer in driver.worker.kv_caches for pool in layer)]

    layout = re.search(r"entry_computation_layout=\{\((.*?)\)->", hlo_text(tensors)).group(1)
    text_shapes = [re.sub(r"\{[^}]*\}", "", s).strip() for s in re.sub(r"/\*index=\d+\*/", "", layout).split(", ")]
    assert [str(p) for p in entry_parameter_shapes(hlo_module_proto(tensors))] == text_shapes


def test_a_failed_export_leaves_no_bucket_file(tiny_llama, tmp_path, monkeypatch) -> None:
    """A directory with bucket files but no manifest could be taken for an export; none is left."""
    model = tiny_llama(96)
    config = EngineConfig(model=model.config, cache=CacheConfig(block_size=BLOCK_SIZE))
    num_calls = 0

    def fail_on_the_second_bucket(tensors):
        nonlocal num_calls
        num_calls += 1
        if num_calls == 2:
            raise RuntimeError("out of memory while lowering")
        return hlo_module_proto(tensors)

    monkeypatch.setattr(hlo_export, "hlo_module_proto", fail_on_the_second_bucket)
    with pytest.raises(RuntimeError, match="out of memory while lowering"):
        export_hlo(model, config, SHAPES, tmp_path / "out", num_kv_blocks=NUM_KV_BLOCKS)
    assert num_calls == 2 and list((tmp_path / "out").iterdir()) == []


def test_export_refuses_a_pool_it_cannot_size(tiny_llama, tmp_path) -> None:
    model = tiny_llama(96)
    config = EngineConfig(model=model.config, cache=CacheConfig(block_size=BLOCK_SIZE))
    with pytest.raises(ValueError, match="num_kv_blocks"):
        export_hlo(model, config, SHAPES, tmp_path)


def test_a_failed_manifest_write_leaves_nothing(tiny_llama, tmp_path, monkeypatch) -> None:
    model = tiny_llama(96)
    config = EngineConfig(model=model.config, cache=CacheConfig(block_size=BLOCK_SIZE))

    def disk_full(source, destination):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hlo_export.os, "replace", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_hlo(model, config, SHAPES, tmp_path / "out", num_kv_blocks=NUM_KV_BLOCKS)
    assert list((tmp_path / "out").iterdir()) == []


def test_export_refuses_a_model_its_config_does_not_describe(tiny_llama, tmp_path) -> None:
    model = tiny_llama(96)
    sharded = EngineConfig(model=model.config, parallel=ParallelConfig(tensor_parallel_size=2))
    # Under tensor parallelism the module is the graph partitioned over that many devices.
    with pytest.raises(ValueError, match="tensor_parallel_size=2 on the XLA device shards over every device"):
        export_hlo(model, sharded, SHAPES, tmp_path / "tp", num_kv_blocks=NUM_KV_BLOCKS)
    in_bf16 = EngineConfig(model=model.config, device=DeviceConfig(dtype="bfloat16"))
    with pytest.raises(ValueError, match="holds torch.float32 weights, not the config's dtype torch.bfloat16"):
        export_hlo(model, in_bf16, SHAPES, tmp_path / "bf16", num_kv_blocks=NUM_KV_BLOCKS)
    assert not (tmp_path / "tp").exists() and not (tmp_path / "bf16").exists()


def test_a_quantized_16_bit_model_exports_with_its_scales_in_float32(tiny_llama, tmp_path) -> None:
    from neuron_llm.quant import quantize_model

    model = tiny_llama(96).to(torch.bfloat16)
    quantize_model(model, "int8")  # int8 weights, float32 scales, the rest bf16
    config = EngineConfig(model=model.config, device=DeviceConfig(dtype="bfloat16"))
    manifest = export_hlo(model, config, SHAPES[:1], tmp_path, num_kv_blocks=NUM_KV_BLOCKS)
    assert manifest["quantization"] == ["int8"] and manifest["dtype"] == "bfloat16"

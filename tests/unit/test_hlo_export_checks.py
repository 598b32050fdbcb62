"""What the HLO export refuses before it traces anything (the export itself is tested under torch-xla)."""

from __future__ import annotations

from pathlib import Path

import pytest

from neuron_llm.buckets import BucketSet
from neuron_llm.compile.hlo_export import GraphShape, dummy_step, export_hlo, graph_shapes
from neuron_llm.config import (
    CacheConfig,
    DeviceConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
    SpeculativeConfig,
)
from neuron_llm.models.llama import LlamaForCausalLM
from neuron_llm.ops.metadata import AttentionMetadata
from neuron_llm.xla import entry_parameter_shapes, entry_parameter_splits

SHAPES = [GraphShape("decode_t4_s4", 4, 4, 8)]


@pytest.fixture
def model() -> LlamaForCausalLM:
    config = ModelConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def test_every_default_bucket_is_an_exportable_shape() -> None:
    buckets = BucketSet.default(max_num_seqs=64, max_num_batched_tokens=2048, max_model_len=8192, block_size=16)
    shapes = [GraphShape(b.name, b.num_tokens, b.num_seqs, buckets.max_blocks_per_seq) for b in buckets.all]
    assert len({shape.name for shape in shapes}) == len(buckets.all)


def test_graphs_are_named_for_their_width_and_features() -> None:
    model = ModelConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=4096,
    )  # fmt: skip
    config = EngineConfig(
        model=model,
        device=DeviceConfig(device="xla", sampling_features=("logprobs",), context_buckets=(1024,)),
        cache=CacheConfig(block_size=16, num_kv_blocks=64),
        scheduler=SchedulerConfig(max_model_len=4096, max_num_seqs=2, max_num_batched_tokens=32),
        speculative=SpeculativeConfig(num_speculative_tokens=2),
    )
    shapes = {shape.name: shape for shape in graph_shapes(config)}
    buckets = BucketSet.for_engine(config)
    graphs_per_width = len(buckets.all) + len(buckets.prefill)  # plain graphs and verification graphs
    assert len(shapes) == 2 * 2 * graphs_per_width  # two widths, with and without the feature
    assert shapes["prefill_t16_s2_verify_c1024+logprobs"].max_blocks_per_seq == 64
    assert shapes["decode_t1_s1_c4096"].max_blocks_per_seq == 256
    # A dummy step decodes exactly where the bucket's real steps do, so a backend whose graph
    # depends on it (the NKI decode attention) exports the graph it serves.
    for shape in shapes.values():
        step = dummy_step(shape)
        metadata = AttentionMetadata.build(
            step.query_lens, step.seq_lens, step.block_tables, 16, "cpu", step.num_padded_tokens,
            step.num_padded_seqs, step.max_blocks_per_seq,
        )  # fmt: skip
        assert shape.decode == shape.name.startswith("decode") == metadata.is_decode, shape.name


@pytest.mark.parametrize("name", ["", ".", "..", "../escaped", "decode/t1"])
def test_a_bucket_name_must_be_a_plain_file_name(name: str) -> None:
    with pytest.raises(ValueError, match="must be a plain file name"):
        GraphShape(name, 4, 4, 8)


def test_bucket_sizes_must_be_positive_integers() -> None:
    with pytest.raises(ValueError, match=r"num_seqs=2\.5 must be an integer >= 1"):
        GraphShape("b", 4, 2.5, 8)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_seqs=8 exceeds num_tokens=4"):
        GraphShape("b", 4, 8, 8)


@pytest.mark.parametrize(("num_kv_blocks", "message"), [(0, "num_kv_blocks=0"), (10.5, "num_kv_blocks=10.5")])
def test_the_pool_size_must_be_an_integer_of_at_least_two(
    model: LlamaForCausalLM, tmp_path: Path, num_kv_blocks: float, message: str
) -> None:
    config = EngineConfig(model=model.config, cache=CacheConfig(block_size=4, num_kv_blocks=100))
    with pytest.raises(ValueError, match=message):
        export_hlo(model, config, SHAPES, tmp_path / "out", num_kv_blocks=num_kv_blocks)  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()


def test_an_out_dir_holding_files_is_refused(model: LlamaForCausalLM, tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text("{}")
    config = EngineConfig(model=model.config, cache=CacheConfig(block_size=4))
    with pytest.raises(ValueError, match="is not a new or empty directory"):
        export_hlo(model, config, SHAPES, tmp_path, num_kv_blocks=20)


@pytest.mark.parametrize("data", [b"\x09\x01", b"\x0d\x01\x02", b"\x0a\x05ab"], ids=["fixed64", "fixed32", "bytes"])
def test_a_truncated_module_is_refused(data: bytes) -> None:
    with pytest.raises(ValueError, match="truncated field in HLO module proto"):
        entry_parameter_shapes(data)


def _field(number: int, value: int | bytes) -> bytes:
    """One protobuf field: a varint, or length-delimited bytes."""

    def varint(n: int) -> bytes:
        out = b""
        while True:
            out += bytes([n & 0x7F | (0x80 if n > 0x7F else 0)])
            n >>= 7
            if not n:
                return out

    if isinstance(value, int):
        return varint(number << 3) + varint(value)
    return varint(number << 3 | 2) + varint(len(value)) + value


def _parameter(number: int, sharding: bytes | None) -> bytes:
    fields = _field(2, b"parameter") + (_field(9, number) if number else b"")  # proto3 leaves 0 out
    return _field(2, fields + (_field(40, sharding) if sharding is not None else b""))


def test_parameter_splits_are_read_from_the_entry_computation_in_parameter_order() -> None:
    tiled = _field(1, 3) + _field(3, bytes([2, 1])) + _field(4, bytes([0, 1]))
    replicated_last = _field(1, 3) + _field(3, bytes([1, 2, 2])) + _field(6, 1)
    entry = _field(5, 7) + _parameter(2, b"") + _parameter(1, replicated_last) + _parameter(0, tiled)
    other = _field(5, 3) + _parameter(0, tiled)  # a called computation's parameter is not the module's
    module = _field(3, other) + _field(3, entry) + _field(6, 7)
    assert entry_parameter_splits(module) == [(2, 1), (1, 2), None]
    with pytest.raises(ValueError, match="HLO module has no entry computation"):
        entry_parameter_splits(_field(3, other) + _field(6, 7))

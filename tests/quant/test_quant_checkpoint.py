"""Quantized checkpoints: the compressed-tensors layout, a bit-exact round trip, and what is refused."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from neuron_llm.config import Llama3RopeScaling, ModelConfig
from neuron_llm.quant import (
    LinearFormat,
    QuantConfig,
    QuantPolicy,
    load_any_format,
    parse_quantization_config,
    quantize_model,
    quantized_linears,
    save_quantized_checkpoint,
)
from neuron_llm.quant.checkpoint import PackedInt8Source, hf_config_dict
from neuron_llm.quant.formats import dequantize_fp8, dequantize_int8
from neuron_llm.quant.packing import pack_int8, unpack_int8
from neuron_llm.quant.policy import ALL_LINEARS, ATTENTION_LINEARS
from tests.quant.conftest import QUANT_LLAMA, save_word_tokenizer

RECIPES = {
    "int8": QuantConfig.for_scheme("int8"),
    "int8-head": QuantConfig.for_scheme("int8", policy=QuantPolicy(lm_head=True)),
    "int8-g64": QuantConfig.for_scheme("int8", group_size=64),
    "fp8": QuantConfig.for_scheme("fp8"),
    "fp8-all-unbounded": QuantConfig.for_scheme("fp8", activation_scale_ub=None, policy=ALL_LINEARS),
    "w8a8": QuantConfig.for_scheme("w8a8"),
}


def random_int8(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(-128, 128, (rows, cols), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)


@pytest.mark.parametrize("cols", [1, 4, 7, 64, 130])
def test_pack_unpack_round_trip_and_matches_compressed_tensors(cols: int) -> None:
    q = random_int8(5, cols)
    packed = pack_int8(q)
    assert packed.dtype == torch.int32 and packed.shape == (5, -(-cols // 4))
    assert torch.equal(unpack_int8(packed, cols), q)
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    assert torch.equal(packed, helpers.pack_to_int32(q, 8))
    assert torch.equal(helpers.unpack_from_int32(packed, 8, torch.Size((5, cols))), q)


def test_packed_source_reads_column_blocks() -> None:
    q = random_int8(6, 30)
    source = PackedInt8Source(pack_int8(q), (6, 30), "m.weight_packed")
    assert torch.equal(source[...], q)
    assert torch.equal(source[2:5], q[2:5])
    for start, end in [(0, 15), (15, 30), (3, 9), (29, 30)]:  # tensor-parallel column shards, aligned or not
        assert torch.equal(source[:, start:end], q[:, start:end])
    with pytest.raises(TypeError, match="contiguous slices"):
        source[:, ::2]


@pytest.mark.parametrize(("recipe", "tied"), [(recipe, False) for recipe in RECIPES] + [("int8-head", True)])
def test_save_load_round_trip_is_bit_exact(
    recipe: str,
    tied: bool,
    save_tiny_llama: Callable[..., tuple[Any, Path]],
    load_fp32: Callable,
    tmp_path: Path,
    paged_runner: type,
) -> None:
    path = save_tiny_llama(**QUANT_LLAMA, tie_word_embeddings=tied)[1]
    save_word_tokenizer(path)
    loaded = load_fp32(path)
    quantize_model(loaded.model, RECIPES[recipe])
    out = tmp_path / "quantized"
    save_quantized_checkpoint(
        loaded.model, loaded.config, out, source=loaded.source, tokenizer=loaded.tokenizer, dtype=torch.float32
    )
    reloaded = load_any_format(out, dtype=torch.float32, device="cpu")

    assert quantized_linears(reloaded.model) == quantized_linears(loaded.model)
    expected = dict(loaded.model.named_parameters())
    actual = dict(reloaded.model.named_parameters())
    assert actual.keys() == expected.keys()
    for name, param in expected.items():
        assert actual[name].dtype == param.dtype, name
        assert torch.equal(actual[name].view(torch.uint8), param.view(torch.uint8)), name
    [before] = paged_runner(loaded.model).logits([list(range(20))])
    [after] = paged_runner(reloaded.model).logits([list(range(20))])
    assert torch.equal(before, after)
    assert reloaded.weight_bytes == loaded_bytes(loaded.model)
    assert (out / "tokenizer.json").is_file()


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    """Where a test writes its checkpoint: a directory that does not exist yet."""
    return tmp_path / "quantized"


def quantized_and_saved(load_fp32: Callable, source: Path, recipe: str | QuantConfig, out_dir: Path) -> Any:
    """``source`` loaded in float32, quantized by ``recipe`` and saved to ``out_dir``, as loaded."""
    loaded = load_fp32(source)
    quantize_model(loaded.model, recipe)
    save_quantized_checkpoint(loaded.model, loaded.config, out_dir, source=loaded.source, tokenizer=None)
    return loaded


def loaded_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("recipe", ["int8", "int8-g64", "fp8", "w8a8"])
def test_written_checkpoint_is_read_by_compressed_tensors(
    recipe: str, quant_checkpoint: tuple[Any, Path], load_fp32: Callable, out_dir: Path
) -> None:
    ct_config = pytest.importorskip("compressed_tensors.quantization").QuantizationConfig
    compressors = pytest.importorskip("compressed_tensors.compressors")
    loaded = quantized_and_saved(load_fp32, quant_checkpoint[1], RECIPES[recipe], out_dir)

    raw = json.loads((out_dir / "config.json").read_text())["quantization_config"]
    config = ct_config.model_validate(raw)
    assert config.quant_method == "compressed-tensors"
    [scheme] = config.config_groups.values()
    assert scheme.targets == ["Linear"] and scheme.weights.num_bits == 8 and scheme.weights.symmetric
    quantized = list(quantized_linears(loaded.model))
    linears = [name for name, m in loaded.model.named_modules() if name.endswith("_proj") or name == "lm_head"]
    assert sorted(config.ignore) == sorted(set(linears) - set(quantized))
    if recipe == "fp8":
        assert config.format == "float-quantized"
        assert (scheme.weights.type, scheme.weights.strategy) == ("float", "channel")
        inputs = scheme.input_activations
        assert (inputs.type, inputs.strategy, inputs.dynamic) == ("float", "token", True)
        assert raw["activation_scale_ub"] == 1200.0
    elif recipe == "w8a8":
        assert config.format == "int-quantized"
        assert (scheme.weights.type, scheme.weights.strategy) == ("int", "channel")
        inputs = scheme.input_activations
        assert (inputs.type, inputs.strategy, inputs.dynamic, inputs.num_bits) == ("int", "token", True, 8)
    else:
        assert config.format == "pack-quantized" and scheme.input_activations is None
        assert scheme.weights.strategy == ("group" if recipe == "int8-g64" else "channel")
        assert scheme.weights.group_size == (64 if recipe == "int8-g64" else None)

    # compressed-tensors' own decompressor turns our tensors into our dequantized weights.
    tensors = load_file(str(out_dir / "model.safetensors"))
    compressor = compressors.BaseCompressor.load_from_registry(config.format)
    for name in quantized:
        layer = loaded.model.get_submodule(name)
        state = {key.removeprefix(f"{name}."): t for key, t in tensors.items() if key.startswith(f"{name}.")}
        weight = compressor.decompress(state, scheme)["weight"].float()
        if recipe == "fp8":
            expected = dequantize_fp8(layer.weight, layer.weight_scale, torch.float32)
        else:
            expected = dequantize_int8(layer.weight, layer.weight_scale, torch.float32, layer.format.group_size)
        assert torch.equal(weight, expected), name


def test_short_last_groups_run_but_are_not_written(
    quant_checkpoint: tuple[Any, Path], load_fp32: Callable, out_dir: Path
) -> None:
    loaded = load_fp32(quant_checkpoint[1])
    quantize_model(loaded.model, QuantConfig.for_scheme("int8", group_size=48))  # 128 = 2 x 48 + 32
    assert loaded.model.model.layers[0].mlp.up_proj.weight_scale.shape == (256, 3)
    with pytest.raises(ValueError, match=r"self_attn\.q_proj: in_features=128 is not a multiple of group_size=48"):
        save_quantized_checkpoint(loaded.model, loaded.config, out_dir, source=loaded.source, tokenizer=None)


def test_naive_int8_checkpoint_from_elsewhere_loads(
    quant_checkpoint: tuple[Any, Path], load_fp32: Callable, paged_runner: type, tmp_path: Path, prompt: list[int]
) -> None:
    """The other int8 layout: a plain int8 ``weight`` with bf16 scales, regex targets and ignores."""
    source = quant_checkpoint[1]
    reference = load_fp32(source)
    quantize_model(reference.model, "int8")
    tensors = load_file(str(source / "model.safetensors"))
    for name in quantized_linears(reference.model):
        layer = reference.model.get_submodule(name)
        tensors[f"{name}.weight"] = layer.weight.detach().clone()
        tensors[f"{name}.weight_scale"] = layer.weight_scale.detach().to(torch.bfloat16)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "naive-quantized",
        "config_groups": {
            "group_0": {
                "targets": ["re:.*_proj$"],
                "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"},
            }
        },
        "ignore": ["lm_head"],
    }
    (tmp_path / "config.json").write_text(json.dumps(config))

    loaded = load_any_format(tmp_path, dtype=torch.float32, device="cpu")
    assert quantized_linears(loaded.model) == quantized_linears(reference.model)
    # Only the scales differ (rounded through bf16), so the logits agree closely.
    [expected] = paged_runner(reference.model).logits([prompt])
    [actual] = paged_runner(loaded.model).logits([prompt])
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-2 * expected.abs().max().item())


def test_a_tied_model_stored_with_a_quantized_head_uses_its_embedding(
    save_tiny_llama: Callable[..., tuple[Any, Path]],
    load_fp32: Callable,
    paged_runner: type,
    out_dir: Path,
    prompt: list[int],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # llm-compressor quantizes a tied model's lm_head unless it is ignored, and leaves the config
    # tied; vLLM then ignores the stored head and embeds with the tied one.
    source = save_tiny_llama(**QUANT_LLAMA, tie_word_embeddings=True)[1]
    reference = load_fp32(source)
    quantize_model(reference.model, "int8")  # the head stays tied
    untied = load_fp32(source)
    quantize_model(untied.model, RECIPES["int8-head"])  # unties the head: an int8 copy is written
    save_quantized_checkpoint(untied.model, untied.config, out_dir, source=source, tokenizer=None, dtype=torch.float32)
    config = json.loads((out_dir / "config.json").read_text())
    assert "lm_head" not in config["quantization_config"]["ignore"]
    (out_dir / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    assert {"lm_head.weight_packed", "lm_head.weight_scale"} <= load_file(out_dir / "model.safetensors").keys()

    loaded = load_any_format(out_dir, dtype=torch.float32, device="cpu")
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    assert quantized_linears(loaded.model) == quantized_linears(reference.model)
    assert "differs from its embedding" in caplog.text
    [expected] = paged_runner(reference.model).logits([prompt])
    [actual] = paged_runner(loaded.model).logits([prompt])
    assert torch.equal(actual, expected)
    # Without an embedding stored beside it, the quantized head has no 16-bit values to give one.
    tensors = load_file(out_dir / "model.safetensors")
    del tensors["model.embed_tokens.weight"]
    save_file(tensors, str(out_dir / "model.safetensors"))
    with pytest.raises(ValueError, match="stores no embedding, only a quantized lm_head"):
        load_any_format(out_dir, dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("target", ["re:.*embed_tokens$", "Embedding", "model.embed_tokens"])
def test_a_quantized_embedding_is_refused_by_name(
    quant_checkpoint: tuple[Any, Path], load_fp32: Callable, out_dir: Path, target: str
) -> None:
    quantized_and_saved(load_fp32, quant_checkpoint[1], "int8", out_dir)
    config = json.loads((out_dir / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["targets"].append(target)
    (out_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"quantizes the embedding \(model\.embed_tokens\), which is not implemented"):
        load_any_format(out_dir, dtype=torch.float32, device="cpu")


def test_w8a8_checkpoint_with_zero_points_from_older_compressed_tensors_loads(
    quant_checkpoint: tuple[Any, Path], load_fp32: Callable, out_dir: Path
) -> None:
    """compressed-tensors wrote all-zero zero points for symmetric schemes until mid-2024."""
    loaded = quantized_and_saved(load_fp32, quant_checkpoint[1], "w8a8", out_dir)
    tensors = load_file(str(out_dir / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj"
    tensors[f"{name}.weight_zero_point"] = torch.zeros(256, 1, dtype=torch.int8)
    tensors[f"{name}.input_zero_point"] = torch.zeros(1, dtype=torch.int8)
    save_file(tensors, str(out_dir / "model.safetensors"))
    reloaded = load_any_format(out_dir, dtype=torch.float32, device="cpu")
    assert torch.equal(reloaded.model.get_submodule(name).weight, loaded.model.get_submodule(name).weight)

    tensors[f"{name}.weight_zero_point"][3] = 2
    save_file(tensors, str(out_dir / "model.safetensors"))
    with pytest.raises(ValueError, match=r"up_proj.weight_zero_point holds non-zero zero points"):
        load_any_format(out_dir, dtype=torch.float32, device="cpu")


def _edit_quantization_config(out_dir: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    config = json.loads((out_dir / "config.json").read_text())
    edit(config["quantization_config"])
    (out_dir / "config.json").write_text(json.dumps(config))


def test_calibration_only_activation_order_loads_and_a_g_idx_is_refused(
    quant_checkpoint: tuple[Any, Path], load_fp32: Callable, out_dir: Path
) -> None:
    """llm-compressor's GPTQ writes actorder "static" by default: a reordering during calibration
    that stores the weights as without it. Only "group" stores a g_idx, applied at run time."""
    loaded = quantized_and_saved(load_fp32, quant_checkpoint[1], "int8-g128", out_dir)
    name = "model.layers.0.mlp.up_proj"
    for actorder in ("static", "Weight"):
        _edit_quantization_config(out_dir, lambda q: q["config_groups"]["group_0"]["weights"].update(actorder=actorder))
        reloaded = load_any_format(out_dir, dtype=torch.float32, device="cpu")
        assert torch.equal(reloaded.model.get_submodule(name).weight, loaded.model.get_submodule(name).weight)
    tensors = load_file(str(out_dir / "model.safetensors"))
    tensors[f"{name}.weight_g_idx"] = torch.zeros(128, dtype=torch.int32)  # one group: every column in 0
    save_file(tensors, str(out_dir / "model.safetensors"))
    with pytest.raises(ValueError, match=r"up_proj.weight_g_idx: activation reordering at run time"):
        load_any_format(out_dir, dtype=torch.float32, device="cpu")


def test_fp8_stored_as_naive_quantized_loads(
    quant_checkpoint: tuple[Any, Path], load_fp32: Callable, out_dir: Path
) -> None:
    """llm-compressor labelled fp8 "naive-quantized" until mid-2024 (and still does for mixed
    schemes): the tensors are those of "float-quantized"."""
    loaded = quantized_and_saved(load_fp32, quant_checkpoint[1], "fp8", out_dir)

    def relabel(quantization: dict[str, Any]) -> None:
        quantization["format"] = "naive-quantized"
        for group in quantization["config_groups"].values():
            group["format"] = "naive-quantized"

    _edit_quantization_config(out_dir, relabel)
    reloaded = load_any_format(out_dir, dtype=torch.float32, device="cpu")
    name = "model.layers.1.mlp.down_proj"
    assert reloaded.model.get_submodule(name).weight.dtype == torch.float8_e4m3fn
    assert torch.equal(
        reloaded.model.get_submodule(name).weight.view(torch.uint8),
        loaded.model.get_submodule(name).weight.view(torch.uint8),
    )


def test_an_infinite_bound_written_by_an_older_quantize_loads_as_none(
    quant_checkpoint: tuple[Any, Path], load_fp32: Callable, out_dir: Path
) -> None:
    quantized_and_saved(load_fp32, quant_checkpoint[1], "fp8", out_dir)
    config = json.loads((out_dir / "config.json").read_text())
    config["quantization_config"]["activation_scale_ub"] = math.inf
    (out_dir / "config.json").write_text(json.dumps(config))  # Python writes Infinity
    formats = set(quantized_linears(load_any_format(out_dir, dtype=torch.float32, device="cpu").model).values())
    assert formats == {LinearFormat("fp8", activation_scale_ub=None)}


def test_a_config_under_its_older_name_compression_config_loads(
    quant_checkpoint: tuple[Any, Path], load_fp32: Callable, out_dir: Path
) -> None:
    quantized = quantized_and_saved(load_fp32, quant_checkpoint[1], RECIPES["int8-g64"], out_dir)
    config = json.loads((out_dir / "config.json").read_text())
    config["compression_config"] = config.pop("quantization_config")  # as llm-compressor wrote it in 2024
    (out_dir / "config.json").write_text(json.dumps(config))
    loaded = load_any_format(out_dir, dtype=torch.float32, device="cpu")
    assert quantized_linears(loaded.model) == quantized_linears(quantized.model)
    name = "model.layers.0.mlp.up_proj"
    assert torch.equal(loaded.model.get_submodule(name).weight, quantized.model.get_submodule(name).weight)


def test_non_finite_quantized_weights_are_refused_on_load(
    quant_checkpoint: tuple[Any, Path], load_fp32: Callable, out_dir: Path
) -> None:
    loaded = load_fp32(quant_checkpoint[1])
    quantize_model(loaded.model, "fp8")
    loaded.model.model.layers[1].mlp.up_proj.weight.data.view(torch.uint8)[0, 0] = 0x7F  # e4m3fn NaN
    save_quantized_checkpoint(loaded.model, loaded.config, out_dir, source=loaded.source, tokenizer=None)
    with pytest.raises(
        ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight: the checkpoint's quantized weight holds 1 NaN"
    ):
        load_any_format(out_dir, dtype=torch.float32, device="cpu")


def _group(**changes: Any) -> dict[str, Any]:
    group = {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"},
        "input_activations": None,
    }
    for key, value in changes.items():
        if key in ("num_bits", "type", "symmetric", "strategy", "actorder", "group_size"):
            group["weights"] = {**group["weights"], key: value}
        else:
            group[key] = value
    return group


FP8_TOKEN = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True}


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"quant_method": "gptq"}, "quant_method='gptq'"),
        ({"kv_cache_scheme": {"num_bits": 8}}, "KV-cache quantization"),
        ({"sparsity_config": {"format": "sparse-24-bitmask"}}, "format 'sparse-24-bitmask' is not read"),
        ({"transform_config": {"config_groups": {"r": {"type": "hadamard", "apply": []}}}}, "transforms"),
        ({"transform_config": "hadamard"}, "transforms"),
        ({"config_groups": {"g": _group(num_bits=4)}}, r"weights\.num_bits=4"),
        ({"config_groups": {"g": _group(symmetric=False)}}, r"weights\.symmetric=False"),
        ({"config_groups": {"g": _group(strategy="tensor")}}, r"weights\.strategy='tensor'"),
        ({"config_groups": {"g": _group(strategy="group")}}, r"weights\.group_size=None: strategy 'group' needs"),
        ({"config_groups": {"g": _group(actorder="group")}}, "activation reordering at run time"),
        ({"config_groups": {"g": _group(actorder="dynamic")}}, "activation reordering at run time"),
        (
            {"config_groups": {"g": _group(input_activations={"num_bits": 8, "type": "int"})}},
            "only dynamic per-token int",
        ),
        ({"config_groups": {"g": _group(type="float")}, "format": "float-quantized"}, "W8A16 fp8"),
        (
            {
                "config_groups": {"g": _group(type="float", input_activations={**FP8_TOKEN, "dynamic": False})},
                "format": "float-quantized",
            },
            "only dynamic per-token float",
        ),
        ({"config_groups": {"W8A16": ["Linear"]}}, "preset scheme names"),
        ({"format": "marlin-24"}, "format 'marlin-24'"),
    ],
)
def test_unsupported_quantization_configs_are_refused(config: dict[str, Any], message: str) -> None:
    raw = {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"g": _group()}}
    with pytest.raises(ValueError, match=message):
        parse_quantization_config({**raw, **config})


def test_dense_stored_sparsity_reads_as_plain_weights() -> None:
    raw = {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"g": _group()}}
    dense = {"format": "dense", "sparsity_structure": "unstructured", "global_sparsity": 0.5}
    assert parse_quantization_config({**raw, "sparsity_config": dense}) == parse_quantization_config(raw)


@pytest.mark.parametrize("transform", [{}, {"config_groups": {}}])
def test_an_empty_transform_config_reads_as_none(transform: dict) -> None:
    # compressed-tensors' ModelCompressor.update_config writes "transform_config": {} into every
    # checkpoint it saves, transforms or not.
    raw = {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"g": _group()}}
    assert parse_quantization_config({**raw, "transform_config": transform}) == parse_quantization_config(raw)


def test_configs_read_as_compressed_tensors_reads_them() -> None:
    # Older configs wrote actorder as a boolean; the enums take any case.
    raw = {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"g": _group()}}
    variant = {**raw, "config_groups": {"g": _group(actorder=False, type="INT", strategy="Channel")}}
    assert parse_quantization_config(variant) == parse_quantization_config(raw)
    with pytest.raises(ValueError, match="activation reordering"):
        parse_quantization_config({**raw, "config_groups": {"g": _group(actorder=True)}})


def test_targets_and_ignore_follow_compressed_tensors_matching() -> None:
    raw = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "config_groups": {"g": _group(targets=["re:.*mlp\\..*"])},
        "ignore": ["model.layers.0.mlp.down_proj", "re:model\\.layers\\.3\\."],
    }
    parsed = parse_quantization_config(raw)
    assert parsed.format_of("model.layers.1.mlp.up_proj") is not None
    assert parsed.format_of("model.layers.1.self_attn.q_proj") is None
    assert parsed.format_of("model.layers.0.mlp.down_proj") is None
    assert parsed.format_of("model.layers.3.mlp.gate_proj") is None


def test_a_linear_in_two_groups_gets_the_scheme_compressed_tensors_gives_it() -> None:
    """Most specific target first (name, then regex, then "Linear"); a target repeated in a later
    group takes that group. Reading groups in order would run down_proj as W8A8 here."""
    quantization = pytest.importorskip("compressed_tensors.quantization")
    from tests.conftest import build_hf_llama

    tokens = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    raw = {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "config_groups": {
            "everything": _group(input_activations=tokens),
            "mlp": _group(targets=["re:.*mlp\\..*", "re:.*down_proj$"]),
            "one": _group(targets=["model.layers.1.mlp.up_proj"], strategy="group", group_size=16),
            "mlp_again": _group(targets=["re:.*mlp\\..*"], strategy="group", group_size=32),
        },
        "ignore": ["lm_head"],
    }
    ours = parse_quantization_config(raw)
    model = build_hf_llama(num_hidden_layers=2)
    quantization.apply_quantization_config(model, quantization.QuantizationConfig.model_validate(raw))
    seen = set()
    for name, module in model.named_modules():
        if scheme := getattr(module, "quantization_scheme", None):
            theirs = ("w8a8" if scheme.input_activations else "int8", scheme.weights.group_size)
            assert (ours.format_of(name).scheme, ours.format_of(name).group_size) == theirs, name
            seen.add(theirs)
    assert seen == {("w8a8", None), ("int8", None), ("int8", 16), ("int8", 32)}


def test_activations_without_a_type_are_int_as_compressed_tensors_reads_them() -> None:
    tokens = {"num_bits": 8, "symmetric": True, "strategy": "token", "dynamic": True}
    raw = {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "config_groups": {"g": _group(input_activations=tokens)},
    }
    assert parse_quantization_config(raw).format_of("model.layers.0.mlp.up_proj").scheme == "w8a8"
    fp8 = {"g": _group(type="float", input_activations=tokens)}  # int activations beside fp8 weights
    with pytest.raises(ValueError, match="only dynamic per-token float activations"):
        parse_quantization_config({**raw, "format": "float-quantized", "config_groups": fp8})


def test_config_rebuilt_for_a_gguf_source_reads_back() -> None:
    config = ModelConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rope_theta=500000.0,
        rope_scaling=Llama3RopeScaling(8.0, 1.0, 4.0, 8192),
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_ids=(2, 3),
    )
    assert ModelConfig.from_hf_config(hf_config_dict(config)) == config


def test_mixed_formats_are_written_as_one_group_each(
    quant_checkpoint: tuple[Any, Path], load_fp32: Callable, out_dir: Path
) -> None:
    loaded = load_fp32(quant_checkpoint[1])
    quantize_model(loaded.model, QuantConfig.for_scheme("int8", policy=QuantPolicy(modules=ATTENTION_LINEARS)))
    quantize_model(loaded.model, "fp8")
    save_quantized_checkpoint(loaded.model, loaded.config, out_dir, source=loaded.source, tokenizer=None)
    raw = json.loads((out_dir / "config.json").read_text())["quantization_config"]
    assert raw["format"] == "mixed-precision"
    assert [group["format"] for group in raw["config_groups"].values()] == ["pack-quantized", "float-quantized"]
    assert raw["config_groups"]["group_1"]["targets"] == [
        f"model.layers.{layer}.mlp.{name}" for layer in (1, 2) for name in ("gate_proj", "up_proj", "down_proj")
    ]
    ct_config = pytest.importorskip("compressed_tensors.quantization").QuantizationConfig
    assert ct_config.model_validate(raw).format == "mixed-precision"
    reloaded = load_any_format(out_dir, dtype=torch.float32, device="cpu")
    assert quantized_linears(reloaded.model) == quantized_linears(loaded.model)

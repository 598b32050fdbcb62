"""Configs: what each Hugging Face config shape turns into, and the message of every refusal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from neuron_llm.config import (
    CacheConfig,
    DeviceConfig,
    EngineConfig,
    LinearRopeScaling,
    Llama3RopeScaling,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    SpeculativeConfig,
    YarnRopeScaling,
    parse_dtype,
    require_visible,
    resolve_dtype,
)

LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "pretraining_tp": 1,
    "tie_word_embeddings": False,
}
LLAMA31_SCALING = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}
# transformers 4.x keys: rope_theta beside rope_scaling.
LLAMA31_8B = {
    **LLAMA2_7B,
    "vocab_size": 128256,
    "intermediate_size": 14336,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rope_scaling": LLAMA31_SCALING,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
}
EXPECTED_LLAMA31_SCALING = Llama3RopeScaling(
    factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
)


def llama(**changes: Any) -> dict[str, Any]:
    return {**LLAMA2_7B, **changes}


def tiny_model(**changes: Any) -> ModelConfig:
    fields = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=8,
    )
    return ModelConfig(**{**fields, **changes})


# --- ModelConfig from Hugging Face dicts ----------------------------------------------------


def test_options_that_compute_the_same_are_read() -> None:
    plain = ModelConfig.from_hf_config(LLAMA2_7B)
    assert ModelConfig.from_hf_config({**LLAMA2_7B, "pretraining_tp": 2, "hidden_act": "swish"}) == plain
    assert ModelConfig.from_hf_config({**LLAMA2_7B, "architectures": ["LLaMAForCausalLM"]}) == plain


def test_llama2_style() -> None:
    config = ModelConfig.from_hf_config(LLAMA2_7B)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (32, 32, 128)
    assert (config.rope_theta, config.rope_scaling) == (10000.0, None)
    assert (config.rms_norm_eps, config.max_position_embeddings) == (1e-5, 4096)
    assert (config.bos_token_id, config.eos_token_ids) == (1, (2,))
    assert not config.tie_word_embeddings


def test_llama31_with_transformers4_rope_scaling() -> None:
    config = ModelConfig.from_hf_config(LLAMA31_8B)
    assert config.rope_theta == 500000.0
    assert config.rope_scaling == EXPECTED_LLAMA31_SCALING
    assert (config.num_key_value_heads, config.head_dim) == (8, 128)
    assert config.eos_token_ids == (128001, 128008, 128009)


def test_llama31_with_transformers5_rope_parameters() -> None:
    hf = {k: v for k, v in LLAMA31_8B.items() if k not in ("rope_theta", "rope_scaling")}
    hf["rope_parameters"] = {**LLAMA31_SCALING, "rope_theta": 500000.0}
    config = ModelConfig.from_hf_config(hf)
    assert config == ModelConfig.from_hf_config(LLAMA31_8B)


def test_transformers5_default_rope_parameters() -> None:
    config = ModelConfig.from_hf_config(llama(rope_parameters={"rope_type": "default", "rope_theta": 100000.0}))
    assert (config.rope_theta, config.rope_scaling) == (100000.0, None)


def test_a_4x_scaling_added_to_a_5x_config_keeps_its_theta() -> None:
    # transformers takes rope_scaling and defaults theta to 10,000: another model than the one saved.
    hf = llama(rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    config = ModelConfig.from_hf_config({**hf, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert (config.rope_theta, config.rope_scaling) == (500000.0, LinearRopeScaling(2.0))


def test_explicit_head_dim() -> None:
    config = ModelConfig.from_hf_config(llama(hidden_size=72, num_attention_heads=3, head_dim=16))
    assert config.head_dim == 16


@pytest.mark.parametrize(("num_kv_heads", "expected"), [(8, 8), (1, 1), (None, 32)])
def test_grouped_query_and_multi_query_attention(num_kv_heads: int | None, expected: int) -> None:
    config = ModelConfig.from_hf_config(llama(num_key_value_heads=num_kv_heads))
    assert config.num_key_value_heads == expected


def test_tied_embeddings_and_no_eos() -> None:
    config = ModelConfig.from_hf_config(llama(tie_word_embeddings=True, eos_token_id=None))
    assert config.tie_word_embeddings
    assert config.eos_token_ids == ()
    assert not ModelConfig.from_hf_config(llama(tie_word_embeddings=None)).tie_word_embeddings


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        # Truthy, but not True: taken as True it would drop the checkpoint's own LM head.
        (dict(tie_word_embeddings="false"), r"tie_word_embeddings='false': must be a bool"),
        # Not "absent": 0 is no head count, so it is refused rather than read as num_attention_heads.
        (dict(num_key_value_heads=0), r"num_key_value_heads=0: must be a positive integer"),
    ],
)
def test_config_json_values_refused_not_coerced(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf_config(llama(**changes))


def test_from_json_file(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA31_8B))
    assert ModelConfig.from_json_file(path) == ModelConfig.from_hf_config(LLAMA31_8B)


# --- Refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            dict(architectures=["MistralForCausalLM"], model_type="mistral"),
            r"unsupported architecture \['MistralForCausalLM'\] \(model_type='mistral'\)",
        ),
        (dict(architectures=None, model_type="qwen2"), r"unsupported architecture 'qwen2'"),
        (dict(model_type=None), r"config.json has no model_type \(a Llama checkpoint's is \"llama\"\)"),
        (dict(architectures=["LlamaForSequenceClassification"]), r"LlamaForSequenceClassification"),
        (dict(attention_bias=True), r"unsupported Llama option attention_bias=True: only False"),
        (dict(mlp_bias=True), r"unsupported Llama option mlp_bias=True"),
        (dict(hidden_act="gelu"), r"unsupported Llama option hidden_act='gelu': only 'silu'"),
        (
            dict(rope_scaling={"type": "longrope", "factor": 2.0}),
            r"unsupported rope_scaling type 'longrope': only 'linear', 'llama3', 'yarn' and 'dynamic'",
        ),
        (dict(rope_scaling={"rope_type": "linear"}), r"rope_scaling of type 'linear' lacks 'factor'"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": "four"}), r"rope_scaling\.factor='four': must be a number"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 4, "truncate": "no"}), r"rope_scaling\.truncate='no'"),
        (
            dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "beta_fast": 0.5}),
            r"rope_scaling\.beta_fast=0\.5: must be at least beta_slow=1\.0",
        ),
        (
            dict(rope_scaling={"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}),
            r"partial_rotary_factor=0\.5: partial rotary embeddings are not implemented",
        ),
        (
            dict(rope_scaling={k: v for k, v in LLAMA31_SCALING.items() if k != "low_freq_factor"}),
            r"rope_scaling of type 'llama3' lacks 'low_freq_factor'",
        ),
    ],
)
def test_refused_hf_configs(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf_config(llama(**changes))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(vocab_size=0), r"vocab_size=0: must be a positive integer"),
        (dict(hidden_size=-4), r"hidden_size=-4: must be a positive integer"),
        (dict(num_hidden_layers=2.5), r"num_hidden_layers=2.5: must be a positive integer"),
        (dict(num_key_value_heads=3), r"num_key_value_heads=3: must divide num_attention_heads=8"),
        (dict(head_dim=7), r"head_dim=7: must be even"),
        (dict(rms_norm_eps=0.0), r"rms_norm_eps=0.0: must be a number > 0"),
        (dict(rms_norm_eps=None), r"rms_norm_eps=None: must be a number > 0"),
        (dict(rope_theta=-1.0), r"rope_theta=-1.0: must be a number > 0"),
        (dict(max_position_embeddings=0), r"max_position_embeddings=0: must be a positive integer"),
    ],
)
def test_bad_model_values(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny_model(**changes)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(factor=0.0), r"rope_scaling\.factor=0\.0: must be > 0"),
        (dict(high_freq_factor=1.0), r"rope_scaling\.high_freq_factor=1\.0: must exceed low_freq_factor=1\.0"),
        (dict(original_max_position_embeddings=0), r"rope_scaling\.original_max_position_embeddings=0"),
    ],
)
def test_bad_rope_scaling_values(changes: dict[str, Any], message: str) -> None:
    fields = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    with pytest.raises(ValueError, match=message):
        Llama3RopeScaling(**{**fields, **changes})


def test_json_file_errors(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        ModelConfig.from_json_file(path)
    path.write_text(json.dumps({k: v for k, v in LLAMA2_7B.items() if k != "num_attention_heads"}))
    with pytest.raises(ValueError, match=r"config\.json lacks the required key 'num_attention_heads'"):
        ModelConfig.from_json_file(path)
    path.write_text("[]")
    with pytest.raises(ValueError, match=r"config\.json holds a JSON list, not an object"):
        ModelConfig.from_json_file(path)
    path.write_text(json.dumps({**LLAMA2_7B, "rms_norm_eps": None}))
    with pytest.raises(ValueError, match=r"config\.json: rms_norm_eps=None: must be a number > 0"):
        ModelConfig.from_json_file(path)


def test_a_model_is_built_only_on_a_device_this_process_sees(monkeypatch: pytest.MonkeyPatch) -> None:
    # A configuration may name another machine's device; building on it is refused by name.
    assert require_visible("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device='cuda': no CUDA device is visible"):
        require_visible("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert require_visible("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match=r"device='cuda:2': only 2 CUDA device\(s\) are visible"):
        require_visible("cuda:2")


# --- ParallelConfig -------------------------------------------------------------------------


def test_parallel_config_value() -> None:
    with pytest.raises(ValueError, match=r"tensor_parallel_size=0: must be an integer >= 1"):
        ParallelConfig(tensor_parallel_size=0)


@pytest.mark.parametrize(
    ("tp", "changes", "message"),
    [
        (3, dict(), r"tensor_parallel_size=3 must divide num_attention_heads=8"),
        (
            2,
            dict(num_attention_heads=6, num_key_value_heads=3, head_dim=8),
            r"tensor_parallel_size=2 and num_key_value_heads=3: one must divide the other",
        ),
        (4, dict(intermediate_size=90), r"tensor_parallel_size=4 must divide intermediate_size=90"),
    ],
)
def test_parallel_config_refuses_unsplittable_models(tp: int, changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ParallelConfig(tensor_parallel_size=tp).check_model(tiny_model(**changes))


def test_a_quantization_tensor_parallel_shards_cannot_hold_is_refused_before_any_rank_starts() -> None:
    def engine(tp: int, quantization: str, **changes: Any) -> EngineConfig:
        return EngineConfig(model=tiny_model(**changes), parallel=ParallelConfig(tp), quantization=quantization)

    with pytest.raises(ValueError, match=r"quantization='int8-head' quantizes the LM head, which runs on one device"):
        engine(2, "int8-head")
    # The XLA device splits the whole model by annotation, the head in 8 bits too.
    xla = EngineConfig(
        model=tiny_model(), device=DeviceConfig(device="xla"), parallel=ParallelConfig(2), quantization="int8-head"
    )
    assert xla.quantization == "int8-head"
    # o_proj's 64 input features split in 32 per rank: groups of 128 would straddle ranks.
    with pytest.raises(ValueError, match=r"group_size=128 does not divide each rank's 32 input features of o_proj"):
        engine(2, "int8-g128")
    wide = dict(head_dim=64, intermediate_size=512)  # 256 input features per rank, each
    assert engine(2, "int8-g128", **wide).quantization == "int8-g128"
    assert engine(1, "int8-head").quantization == "int8-head"  # one device holds the 8-bit head
    assert engine(2, "int8").quantization == "int8"  # per-channel scales follow their rows


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_parallel_config_splits_or_replicates_kv_heads(tp: int) -> None:
    # 2 KV heads: split across 2 ranks, replicated across 4 or 8.
    from neuron_llm.worker import num_kv_heads_per_rank

    model = tiny_model(num_key_value_heads=2)
    ParallelConfig(tensor_parallel_size=tp).check_model(model)
    assert num_kv_heads_per_rank(model, tp) == (2 if tp == 1 else 1)


# --- The other configs ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(block_size=12), r"block_size=12: must be a positive power of two"),
        (dict(block_size=0), r"block_size=0"),
        (dict(block_size=True), r"block_size=True"),
        (dict(num_kv_blocks=1), r"num_kv_blocks=1: must be None or an integer > 1"),
        (dict(memory_fraction=0.0), r"memory_fraction=0\.0: must be a number in \(0, 1\]"),
        (dict(memory_fraction=1.5), r"memory_fraction=1\.5"),
        (dict(memory_fraction="0.5"), r"memory_fraction='0\.5': must be a number"),
        (dict(memory_fraction=float("nan")), r"memory_fraction=nan: must be a number"),
        (dict(enable_prefix_caching="no"), r"enable_prefix_caching='no': must be a bool"),
    ],
)
def test_cache_config_values(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CacheConfig(**changes)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(max_model_len=0), r"max_model_len=0: must be None or a positive integer"),
        (dict(max_model_len=True), r"max_model_len=True: must be None or a positive integer"),
        (dict(max_num_seqs=0), r"max_num_seqs=0: must be an integer >= 1"),
        (dict(max_num_seqs=2.5), r"max_num_seqs=2\.5: must be an integer >= 1"),
        (dict(max_num_seqs="64"), r"max_num_seqs='64': must be an integer >= 1"),
        (dict(max_num_batched_tokens=0), r"max_num_batched_tokens=0: must be an integer >= 1"),
        (dict(max_num_batched_tokens=1000.5), r"max_num_batched_tokens=1000\.5: must be an integer >= 1"),
        (dict(enable_chunked_prefill="false"), r"enable_chunked_prefill='false': must be a bool"),
    ],
)
def test_scheduler_config_values(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SchedulerConfig(**changes)


def test_device_config_values() -> None:
    with pytest.raises(ValueError, match=r"device='gpu0' is not a valid torch device"):
        DeviceConfig(device="gpu0")
    with pytest.raises(ValueError, match=r"device='cuda:x' is not a valid torch device"):
        DeviceConfig(device="cuda:x")
    with pytest.raises(ValueError, match=r"device='neuron' is not a valid torch device \(a NeuronCore is the 'xla'"):
        DeviceConfig(device="neuron")
    with pytest.raises(ValueError, match=r"device='mps': neuron-llm runs on cpu, cuda, cuda:N or xla"):
        DeviceConfig(device="mps")
    with pytest.raises(ValueError, match=r"dtype=torch\.int8 is not supported"):
        DeviceConfig(dtype=torch.int8)
    with pytest.raises(ValueError, match=r"max_prefill_graph_tokens=-1 must be an integer >= 0"):
        DeviceConfig(max_prefill_graph_tokens=-1)
    with pytest.raises(ValueError, match=r"enforce_eager='no': must be a bool"):
        DeviceConfig(enforce_eager="no")
    # Names and torch.device objects are taken, and stored in the one form every reader expects.
    config = DeviceConfig(device=torch.device("cpu"), dtype="bfloat16")
    assert (config.device, config.dtype, config.backend_name) == ("cpu", torch.bfloat16, "torch")


def test_speculation_turns_async_scheduling_off() -> None:
    model = ModelConfig.from_hf_config(LLAMA2_7B)
    speculative = SpeculativeConfig(num_speculative_tokens=3)
    on_cuda = EngineConfig(model=model, device=DeviceConfig(device="cuda"), speculative=speculative)
    assert not on_cuda.async_scheduling
    assert EngineConfig(model=model, device=DeviceConfig(device="cuda")).async_scheduling
    assert EngineConfig(model=model, device=DeviceConfig(device="xla"), speculative=speculative).speculative


@pytest.mark.parametrize(
    ("name", "expected"),
    [("bf16", torch.bfloat16), ("float16", torch.float16), ("fp32", torch.float32), (torch.bfloat16, torch.bfloat16)],
)
def test_parse_dtype(name: str | torch.dtype, expected: torch.dtype) -> None:
    assert parse_dtype(name) == expected


def test_parse_dtype_refuses_unknown_names() -> None:
    with pytest.raises(ValueError, match=r"dtype='int4' is not supported"):
        parse_dtype("int4")


def test_engine_config_takes_max_model_len_from_the_model() -> None:
    config = EngineConfig(model=tiny_model(max_position_embeddings=512))
    assert config.max_model_len == 512
    assert EngineConfig(model=tiny_model(), scheduler=SchedulerConfig(max_model_len=100)).max_model_len == 100


@pytest.mark.parametrize(
    ("scaling", "expected"),
    [
        # As vLLM derives it: Vicuna 16k's config says 4096 positions and a linear factor of 4.
        (LinearRopeScaling(4.0), 2048),
        (YarnRopeScaling(16.0, 64, attention_factor=1.0), 1024),
        (Llama3RopeScaling(8.0, 1.0, 4.0, 64), 512),
    ],
)
def test_rope_scaling_stretches_the_context(scaling: Any, expected: int) -> None:
    model = tiny_model(max_position_embeddings=512, rope_scaling=scaling)
    assert model.max_context_len == EngineConfig(model=model).max_model_len == expected
    message = rf"max_model_len={expected + 1} exceeds the model's context \(.*{expected}"
    with pytest.raises(ValueError, match=message):
        EngineConfig(model=model, scheduler=SchedulerConfig(max_model_len=expected + 1))


def test_engine_config_refusals() -> None:
    with pytest.raises(
        ValueError, match=r"max_model_len=1024 exceeds the model's context \(max_position_embeddings=512\)"
    ):
        EngineConfig(model=tiny_model(max_position_embeddings=512), scheduler=SchedulerConfig(max_model_len=1024))
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 must divide num_attention_heads=8"):
        EngineConfig(model=tiny_model(), parallel=ParallelConfig(tensor_parallel_size=3))
    with pytest.raises(ValueError, match=r"async_scheduling=True is not supported on the XLA device"):
        EngineConfig(model=tiny_model(), device=DeviceConfig("xla"), scheduler=SchedulerConfig(async_scheduling=True))
    with pytest.raises(ValueError, match=r"async_scheduling='yes': must be a bool"):
        SchedulerConfig(async_scheduling="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"num_speculative_tokens=16 must be below max_model_len=16"):
        EngineConfig(
            model=tiny_model(),
            scheduler=SchedulerConfig(max_model_len=16),
            speculative=SpeculativeConfig(num_speculative_tokens=16),
        )
    speculative = SpeculativeConfig(num_speculative_tokens=15)
    assert EngineConfig(model=tiny_model(), scheduler=SchedulerConfig(max_model_len=16), speculative=speculative)


@pytest.mark.parametrize(
    ("device", "tensor_parallel_size", "expected"),
    [("cuda", 1, True), ("cuda:1", 1, True), ("cuda", 2, False), ("cpu", 1, False), ("xla", 1, False)],
)
def test_async_scheduling_defaults_to_one_cuda_device(device: str, tensor_parallel_size: int, expected: bool) -> None:
    parallel = ParallelConfig(tensor_parallel_size=tensor_parallel_size)
    assert EngineConfig(model=tiny_model(), device=DeviceConfig(device), parallel=parallel).async_scheduling is expected
    for forced in (False, True) if device != "xla" else (False,):
        scheduler = SchedulerConfig(async_scheduling=forced)
        config = EngineConfig(model=tiny_model(), device=DeviceConfig(device), parallel=parallel, scheduler=scheduler)
        assert config.async_scheduling is forced


def test_auto_is_bfloat16_on_accelerators_and_float32_on_the_cpu() -> None:
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda:1") == resolve_dtype("auto", "xla") == torch.bfloat16
    assert resolve_dtype("fp16", "cpu") == torch.float16
    # Where "auto" is taken, the error lists it with the names.
    with pytest.raises(ValueError, match=r"dtype='half-ish' is not supported; use one of \['auto', 'bf16'"):
        resolve_dtype("half-ish", "cpu")

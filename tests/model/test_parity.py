"""Our Llama, loaded from a saved Hugging Face checkpoint, against transformers on the same weights.

fp32 on the CPU: all-position logits agree to 1e-4 of their scale and greedy continuations
are identical, for every attention layout and option we claim to support.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file, save_model

from neuron_llm import ops
from neuron_llm.backends.torch_backend import TorchBackend
from neuron_llm.config import LinearRopeScaling, Llama3RopeScaling, RopeScaling, YarnRopeScaling
from neuron_llm.loader import load_model
from neuron_llm.models.merge import merge_projections

NUM_NEW_TOKENS = 32
F32, F16, Q8_0 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.Q8_0
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Short, so that the scaling reshapes most frequencies even for these short prompts.
    "original_max_position_embeddings": 16,
}
# Short original contexts, so that the scaling changes most frequencies even for short prompts.
LINEAR_ROPE = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}
YARN_ROPE = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}
CONFIGS: dict[str, dict[str, Any]] = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2),
    "mqa": dict(num_attention_heads=4, num_key_value_heads=1),
    "llama3_rope": dict(rope_parameters=LLAMA3_ROPE),
    "linear_rope": dict(rope_parameters=LINEAR_ROPE),
    # Plain RoPE within max_position_embeddings, in transformers as here.
    "dynamic_rope": dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}),
    # YaRN also scales cos and sin (by 0.1 ln 4 + 1); head_dim 32 puts frequencies on its ramp.
    "yarn_rope": dict(num_attention_heads=2, num_key_value_heads=1, head_dim=32, rope_parameters=YARN_ROPE),
    "tied": dict(tie_word_embeddings=True),
    "odd_sizes": dict(
        hidden_size=72, num_attention_heads=3, num_key_value_heads=3, head_dim=16, intermediate_size=100, vocab_size=997
    ),
    "sharded": dict(max_shard_size="40KB"),
}


def random_prompt(length: int, vocab_size: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (length,), generator=generator).tolist()


def hf_greedy(hf_model: Any, prompt: list[int], num_new_tokens: int) -> list[int]:
    output = hf_model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=num_new_tokens)
    return output[0, len(prompt) :].tolist()


def hf_logits(hf_model: Any, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([prompt])).logits[0]


def assert_close_logits(ours: torch.Tensor, reference: torch.Tensor) -> None:
    max_diff = (ours - reference).abs().max().item()
    scale = reference.abs().max().item()
    assert max_diff <= 1e-4 * scale, f"max |diff| {max_diff:.3g} exceeds 1e-4 of the logits' scale {scale:.3g}"


@pytest.fixture(params=list(CONFIGS), ids=list(CONFIGS))
def checkpoint(request: pytest.FixtureRequest, save_tiny_llama: Callable[..., tuple[Any, Path]]) -> tuple[Any, Path]:
    return save_tiny_llama(**CONFIGS[request.param])


def test_logits_and_greedy_match_transformers(checkpoint: tuple[Any, Path], paged_runner: type) -> None:
    hf_model, path = checkpoint
    loaded = load_model(str(path), dtype=torch.float32, device="cpu")
    runner = paged_runner(loaded.model)
    prompt = random_prompt(13, hf_model.config.vocab_size, seed=1)

    [logits] = runner.logits([prompt])
    assert_close_logits(logits, hf_logits(hf_model, prompt))
    assert runner.greedy([prompt], NUM_NEW_TOKENS) == [hf_greedy(hf_model, prompt, NUM_NEW_TOKENS)]


class StreamWhole(TorchBackend):
    """Returns the residual stream whole from the o and down projections, the residual added
    there (as the CUDA GEMVs of one row do), not left to the next norm."""

    def linear_residual(self, x: torch.Tensor, linear: torch.nn.Module, residual: torch.Tensor | None) -> Any:
        return linear(x) if residual is None else linear(x) + residual, None

    def feed_forward(self, *args: Any) -> Any:
        out, residual = super().feed_forward(*args)
        return out + residual, None


def test_a_backend_that_returns_the_stream_whole_matches_transformers(
    save_tiny_llama: Callable[..., tuple[Any, Path]], paged_runner: type
) -> None:
    hf_model, path = save_tiny_llama()
    loaded = load_model(str(path), dtype=torch.float32, device="cpu")
    merge_projections(loaded.model)  # feed_forward takes the merged gate/up
    prompt = random_prompt(13, hf_model.config.vocab_size, seed=4)
    with ops.using_backend(StreamWhole()):
        runner = paged_runner(loaded.model)
        [logits] = runner.logits([prompt])
        greedy = runner.greedy([prompt], NUM_NEW_TOKENS)
    assert_close_logits(logits, hf_logits(hf_model, prompt))
    assert greedy == [hf_greedy(hf_model, prompt, NUM_NEW_TOKENS)]


def test_sharded_checkpoint_is_read_through_its_index(save_tiny_llama: Callable[..., tuple[Any, Path]]) -> None:
    _, path = save_tiny_llama(**CONFIGS["sharded"])
    shards = set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert len(shards) > 1, "max_shard_size did not force a sharded checkpoint"
    assert not (path / "model.safetensors").exists()


def test_two_prompts_in_one_flat_batch(save_tiny_llama: Callable[..., tuple[Any, Path]], paged_runner: type) -> None:
    hf_model, path = save_tiny_llama()
    loaded = load_model(path, dtype=torch.float32, device="cpu")
    runner = paged_runner(loaded.model)
    prompts = [random_prompt(5, 256, seed=2), random_prompt(11, 256, seed=3)]

    for logits, prompt in zip(runner.logits(prompts), prompts, strict=True):
        assert_close_logits(logits, hf_logits(hf_model, prompt))
    expected = [hf_greedy(hf_model, prompt, NUM_NEW_TOKENS) for prompt in prompts]
    assert runner.greedy(prompts, NUM_NEW_TOKENS) == expected


def test_tied_checkpoint_storing_only_the_head_loads(
    save_tiny_llama: Callable[..., tuple[Any, Path]], paged_runner: type
) -> None:
    # safetensors' save_model keeps one name of a shared tensor, the first in sorted order:
    # lm_head.weight, not model.embed_tokens.weight.
    hf_model, path = save_tiny_llama(tie_word_embeddings=True)
    save_model(hf_model, str(path / "model.safetensors"))
    with safe_open(path / "model.safetensors", "pt") as stored:
        assert "lm_head.weight" in stored.keys() and "model.embed_tokens.weight" not in stored.keys()
    loaded = load_model(path, dtype=torch.float32, device="cpu")
    prompt = random_prompt(13, hf_model.config.vocab_size, seed=4)
    [logits] = paged_runner(loaded.model).logits([prompt])
    assert_close_logits(logits, hf_logits(hf_model, prompt))


def test_checkpoint_named_without_the_model_prefix_loads(
    save_tiny_llama: Callable[..., tuple[Any, Path]], paged_runner: type
) -> None:
    hf_model, path = save_tiny_llama()
    stored = load_file(path / "model.safetensors")
    save_file({name.removeprefix("model."): t for name, t in stored.items()}, path / "model.safetensors")
    loaded = load_model(path, dtype=torch.float32, device="cpu")
    prompt = random_prompt(13, hf_model.config.vocab_size, seed=5)
    [logits] = paged_runner(loaded.model).logits([prompt])
    assert_close_logits(logits, hf_logits(hf_model, prompt))


def test_rotary_tables_saved_in_a_checkpoint_are_skipped(
    save_tiny_llama: Callable[..., tuple[Any, Path]], paged_runner: type
) -> None:
    # ColossalAI saves each layer's cos/sin tables (vLLM and transformers skip them); filled
    # with garbage here, so that loading them anywhere would change the logits.
    hf_model, path = save_tiny_llama()
    stored = load_file(path / "model.safetensors")
    for name in ("inv_freq", "cos_cached", "sin_cached"):
        stored[f"model.layers.0.self_attn.rotary_emb.{name}"] = torch.full((7, 3), 1e4)
    save_file(stored, path / "model.safetensors")
    loaded = load_model(path, dtype=torch.float32, device="cpu")
    prompt = random_prompt(13, hf_model.config.vocab_size, seed=6)
    [logits] = paged_runner(loaded.model).logits([prompt])
    assert_close_logits(logits, hf_logits(hf_model, prompt))


def test_loaded_model_is_frozen_in_the_requested_dtype(save_tiny_llama: Callable[..., tuple[Any, Path]]) -> None:
    hf_model, path = save_tiny_llama(tie_word_embeddings=True)
    loaded = load_model(path, dtype=torch.bfloat16, device="cpu")
    params = list(loaded.model.parameters())
    assert {p.dtype for p in params} == {torch.bfloat16}
    assert not any(p.requires_grad for p in params)
    assert not loaded.model.training
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    # Rotary frequencies stay fp32 whatever the weights' dtype.
    assert loaded.model.model.rotary.inv_freq.dtype == torch.float32
    assert loaded.weight_bytes == 2 * sum(p.numel() for p in hf_model.parameters())
    expected = hf_model.model.embed_tokens.weight.to(torch.bfloat16)
    assert torch.equal(loaded.model.model.embed_tokens.weight, expected)
    assert loaded.tokenizer is None
    assert loaded.eos_token_ids == ()


# Hugging Face -> GGUF tensor names, as llama.cpp's converter writes them.
GGUF_NAMES = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
GGUF_CONFIGS: dict[str, dict[str, Any]] = {
    "gqa": {},
    "mqa_untied": dict(num_key_value_heads=1),
    "tied": dict(tie_word_embeddings=True),
    "odd_sizes": CONFIGS["odd_sizes"],
    # Enough rotary frequencies (head_dim 32) between the two wavelength bounds for llama.cpp's
    # rope_freqs tensor to determine the scaling.
    "llama3_rope": dict(
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        rope_parameters={**LLAMA3_ROPE, "original_max_position_embeddings": 64},
    ),
    "linear_rope": CONFIGS["linear_rope"],
    "yarn_rope": CONFIGS["yarn_rope"],
}


def gguf_name(hf_name: str) -> str:
    stem, _, suffix = hf_name.rpartition(".")
    if stem.startswith("model.layers."):
        _, _, layer, module = stem.split(".", 3)
        return f"blk.{layer}.{GGUF_NAMES[module]}.{suffix}"
    return f"{GGUF_NAMES[stem]}.{suffix}"


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's converter: interleave the two rotary halves of each head's rows."""
    return (
        weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def llama_cpp_rope_freqs(config: Any) -> np.ndarray:
    """The per-frequency divisors llama.cpp's converter writes for Llama 3.1 rope scaling."""
    rope = config.rope_parameters
    head_dim = config.head_dim
    context = rope["original_max_position_embeddings"]
    low, high, factor = rope["low_freq_factor"], rope["high_freq_factor"], rope["factor"]
    factors = []
    for freq in 1.0 / (rope["rope_theta"] ** (np.arange(0, head_dim, 2) / head_dim)):
        wavelength = 2 * math.pi / freq
        if wavelength < context / high:
            factors.append(1.0)
        elif wavelength > context / low:
            factors.append(factor)
        else:
            smooth = (context / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def expected_rope_scaling(rope: dict[str, Any]) -> RopeScaling | None:
    """The scaling a GGUF file written by ``write_gguf`` describes, for the rope parameters of its model."""
    kind = rope["rope_type"]
    if kind == "llama3":
        return Llama3RopeScaling(
            rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"], rope["original_max_position_embeddings"]
        )
    if kind == "linear":
        return LinearRopeScaling(rope["factor"])
    if kind == "yarn":
        attention_factor = 0.1 * math.log(rope["factor"]) + 1
        return YarnRopeScaling(rope["factor"], rope["original_max_position_embeddings"], attention_factor)
    return None


def write_gguf(hf_model: Any, path: Path, matrix_type: gguf.GGMLQuantizationType = F32) -> None:
    """Write ``hf_model`` as llama.cpp's converter would, without a tokenizer: its matrices in
    ``matrix_type`` (F32, F16 or Q8_0), norms and rotary factors in float32."""
    config = hf_model.config
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = config.rope_parameters
    if rope["rope_type"] == "llama3":
        writer.add_tensor("rope_freqs.weight", llama_cpp_rope_freqs(config))
    elif rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif rope["rope_type"] == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    for name, tensor in hf_model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        weight = tensor.numpy()
        if name.endswith("q_proj.weight"):
            weight = llama_cpp_permute(weight, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            weight = llama_cpp_permute(weight, config.num_key_value_heads)
        if weight.ndim == 2 and matrix_type != F32:
            data = gguf.quants.quantize(weight, matrix_type)
            writer.add_tensor(gguf_name(name), data, raw_shape=data.shape, raw_dtype=matrix_type)
        else:
            writer.add_tensor(gguf_name(name), weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def round_trip_matrices(hf_model: Any, matrix_type: gguf.GGMLQuantizationType) -> None:
    """Replace each matrix of ``hf_model`` by the values a GGUF file of ``matrix_type`` holds.

    Q8_0 scales blocks of 32 along a row, and llama.cpp's permutation only reorders rows, so
    rounding before or after it gives the same values; rounding them twice changes nothing.
    """
    with torch.no_grad():
        for tensor in hf_model.state_dict().values():
            if tensor.dim() == 2:
                data = gguf.quants.quantize(tensor.numpy(), matrix_type)
                tensor.copy_(torch.from_numpy(gguf.quants.dequantize(data, matrix_type)))


@pytest.mark.parametrize("matrix_type", [F16, Q8_0], ids=["F16", "Q8_0"])
def test_gguf_of_16_and_8_bit_matrices_matches_transformers(
    matrix_type: gguf.GGMLQuantizationType, tmp_path: Path, tiny_hf_llama: Callable[..., Any], paged_runner: type
) -> None:
    """llama.cpp's F16 and Q8_0 files: the loader dequantizes them to the values transformers
    runs on the same rounded weights."""
    hf_model = tiny_hf_llama(num_key_value_heads=1)
    round_trip_matrices(hf_model, matrix_type)
    write_gguf(hf_model, tmp_path / "tiny.gguf", matrix_type)
    loaded = load_model(tmp_path / "tiny.gguf", dtype=torch.float32, device="cpu")
    runner = paged_runner(loaded.model)
    prompt = random_prompt(13, hf_model.config.vocab_size, seed=5)

    [logits] = runner.logits([prompt])
    assert_close_logits(logits, hf_logits(hf_model, prompt))
    assert runner.greedy([prompt], NUM_NEW_TOKENS) == [hf_greedy(hf_model, prompt, NUM_NEW_TOKENS)]


@pytest.mark.parametrize("overrides", list(GGUF_CONFIGS.values()), ids=list(GGUF_CONFIGS))
def test_gguf_matches_transformers(
    overrides: dict[str, Any], tmp_path: Path, tiny_hf_llama: Callable[..., Any], paged_runner: type
) -> None:
    hf_model = tiny_hf_llama(**overrides)
    write_gguf(hf_model, tmp_path / "tiny.gguf")
    loaded = load_model(tmp_path, dtype=torch.float32, device="cpu")  # a directory with one .gguf
    assert loaded.config.tie_word_embeddings == hf_model.config.tie_word_embeddings
    expected = expected_rope_scaling(hf_model.config.rope_parameters)
    assert loaded.config.rope_scaling == expected
    runner = paged_runner(loaded.model)
    prompt = random_prompt(13, hf_model.config.vocab_size, seed=4)

    [logits] = runner.logits([prompt])
    assert_close_logits(logits, hf_logits(hf_model, prompt))
    assert runner.greedy([prompt], NUM_NEW_TOKENS) == [hf_greedy(hf_model, prompt, NUM_NEW_TOKENS)]

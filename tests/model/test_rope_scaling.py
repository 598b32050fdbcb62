"""Each rope scaling's frequencies, cos and sin against transformers', read from the same config.json.

The configs are those of released long-context Llamas (Vicuna 16k's linear scaling, YaRN
Llama 2 64k, Llama 3.1), and the variations transformers resolves: defaults taken from
elsewhere in the config, YaRN's explicit or derived magnitude factor, untruncated ramps.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from neuron_llm import config as config_module
from neuron_llm.config import ModelConfig
from neuron_llm.layers.rotary import RotaryEmbedding
from neuron_llm.quant.checkpoint import hf_config_dict

BASE = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 512,
    "intermediate_size": 1024,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
}
YARN_64K = {
    "max_position_embeddings": 65536,
    "rope_scaling": {"type": "yarn", "factor": 16.0, "original_max_position_embeddings": 4096, "finetuned": True},
}
CONFIGS: dict[str, dict[str, Any]] = {
    "vicuna_16k_linear": {"max_position_embeddings": 16384, "rope_scaling": {"type": "linear", "factor": 4.0}},
    "yarn_64k": YARN_64K,
    "yarn_explicit_attention_factor": {
        **YARN_64K,
        "rope_scaling": {**YARN_64K["rope_scaling"], "attention_factor": 1.5, "beta_fast": 16, "beta_slow": 2},
    },
    "yarn_mscale_ratio": {
        **YARN_64K,
        "rope_scaling": {**YARN_64K["rope_scaling"], "mscale": 1.0, "mscale_all_dim": 0.5},
    },
    "yarn_untruncated": {**YARN_64K, "rope_scaling": {**YARN_64K["rope_scaling"], "truncate": False}},
    "yarn_null_betas": {**YARN_64K, "rope_scaling": {**YARN_64K["rope_scaling"], "beta_fast": None, "beta_slow": None}},
    "yarn_null_truncate": {**YARN_64K, "rope_scaling": {**YARN_64K["rope_scaling"], "truncate": None}},
    # A null factor is the ratio of the two contexts.
    "yarn_null_factor": {**YARN_64K, "rope_scaling": {**YARN_64K["rope_scaling"], "factor": None}},
    "yarn_float_context": {
        **YARN_64K,
        "rope_scaling": {**YARN_64K["rope_scaling"], "original_max_position_embeddings": 4096.0},
    },
    # transformers takes the original context from the top level over the rope parameters...
    "yarn_top_level_context": {**YARN_64K, "original_max_position_embeddings": 2048},
    # ...and from max_position_embeddings when neither has it.
    "yarn_no_context": {"max_position_embeddings": 8192, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}},
    "llama31": {
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    },
    "llama3_no_context": {
        "max_position_embeddings": 8192,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
    },
}


@pytest.mark.parametrize("changes", list(CONFIGS.values()), ids=list(CONFIGS))
def test_rotary_matches_transformers(changes: dict[str, Any]) -> None:
    hf = {**BASE, **changes}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' notes on keys it ignores ("finetuned")
        reference = LlamaRotaryEmbedding(LlamaConfig(**hf))
    config = ModelConfig.from_hf_config(hf)
    assert config.rope_scaling is not None
    ours = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)

    assert torch.equal(ours.inv_freq, reference.inv_freq)
    assert ours.attention_factor == pytest.approx(reference.attention_scaling, rel=1e-12)
    positions = torch.tensor([0, 1, 7, 100, 4095, 4096, 20000, 65535])
    query = torch.ones(1, len(positions), config.head_dim)
    cos, sin = ours(positions, torch.float32)
    reference_cos, reference_sin = reference(query, positions[None])
    torch.testing.assert_close(cos[:, 0], reference_cos[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(sin[:, 0], reference_sin[0], rtol=0, atol=1e-6)


def test_scaling_survives_a_rebuilt_config() -> None:
    # A quantized checkpoint of a GGUF model writes its config.json from ModelConfig.
    for changes in CONFIGS.values():
        config = ModelConfig.from_hf_config({**BASE, **changes})
        assert ModelConfig.from_hf_config(hf_config_dict(config)) == config


def test_dynamic_ntk_is_plain_rope_up_to_the_context_as_in_transformers(caplog: pytest.LogCaptureFixture) -> None:
    hf = {**BASE, "rope_scaling": {"type": "dynamic", "factor": 2.0}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = LlamaRotaryEmbedding(LlamaConfig(**hf))
    config_module._warn_once.cache_clear()
    config = ModelConfig.from_hf_config(hf)
    # Warned once, though the LLM and its worker each read the config.
    assert ModelConfig.from_hf_config(hf) == config
    assert caplog.text.count("longer sequences are refused") == 1
    # Beyond max_position_embeddings transformers re-rotates every key: refused, not approximated.
    assert (config.rope_scaling, config.max_context_len) == (None, BASE["max_position_embeddings"])
    ours = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
    positions = torch.tensor([0, 1, 7, 100, 4095])
    cos, sin = ours(positions, torch.float32)
    reference_cos, reference_sin = reference(torch.ones(1, len(positions), config.head_dim), positions[None])
    torch.testing.assert_close(cos[:, 0], reference_cos[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(sin[:, 0], reference_sin[0], rtol=0, atol=1e-6)

"""Quantized weight formats (decision 7): int8 weight-only and fp8 W8A8, as layers, recipes and checkpoints.

A quantizer swaps ``Linear`` for ``Int8Linear`` or ``Fp8Linear``: ``quantize_model`` on a loaded
model, ``prepare_quantized_model`` on a freshly built one whose compressed-tensors checkpoint
is then loaded through ``adapt_checkpoint_weights``.
"""

from __future__ import annotations

from neuron_llm.quant.checkpoint import (
    CheckpointQuantization,
    adapt_checkpoint_weights,
    parse_quantization_config,
    quantization_config_dict,
    read_quantization_config,
    save_quantized_checkpoint,
)
from neuron_llm.quant.config import PRESETS, QuantConfig, resolve_quant_config
from neuron_llm.quant.convert import QuantizedBytes, prepare_quantized_model, quantize_model, quantized_weight_bytes
from neuron_llm.quant.formats import DEFAULT_ACTIVATION_SCALE_UB, LinearFormat
from neuron_llm.quant.layers import Fp8Linear, Int8Linear, quantized_linears
from neuron_llm.quant.loading import load_any_format
from neuron_llm.quant.policy import ALL_LINEARS, LLAMA3_FP8, QuantPolicy

__all__ = [
    "ALL_LINEARS",
    "DEFAULT_ACTIVATION_SCALE_UB",
    "LLAMA3_FP8",
    "PRESETS",
    "CheckpointQuantization",
    "Fp8Linear",
    "Int8Linear",
    "LinearFormat",
    "QuantConfig",
    "QuantPolicy",
    "QuantizedBytes",
    "adapt_checkpoint_weights",
    "load_any_format",
    "parse_quantization_config",
    "prepare_quantized_model",
    "quantization_config_dict",
    "quantize_model",
    "quantized_linears",
    "quantized_weight_bytes",
    "read_quantization_config",
    "resolve_quant_config",
    "save_quantized_checkpoint",
]

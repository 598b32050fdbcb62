"""Quantized weight formats (decision 7): int8 weight-only, fp8 W8A8 and int8 W8A8, as layers, recipes and checkpoints.

A quantizer swaps ``Linear`` for a ``QuantizedLinear`` (``Int8Linear``, ``Fp8Linear``,
``W8A8Linear``): ``quantize_model`` on a loaded model, ``prepare_quantized_model`` on a freshly
built one whose compressed-tensors checkpoint is then loaded through
``adapt_checkpoint_weights``. ``smoothquant`` prepares a 16-bit model for W8A8.

Names are exported lazily: the backends import ``neuron_llm.quant.reference`` while the model
and ops are still being imported, so this package must not import them itself.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "CheckpointQuantization": "checkpoint",
    "adapt_checkpoint_weights": "checkpoint",
    "parse_quantization_config": "checkpoint",
    "quantization_config_dict": "checkpoint",
    "read_quantization_config": "checkpoint",
    "save_quantized_checkpoint": "checkpoint",
    "PRESETS": "config",
    "QuantConfig": "config",
    "resolve_quant_config": "config",
    "QuantizedBytes": "convert",
    "prepare_quantized_model": "convert",
    "quantize_model": "convert",
    "quantized_weight_bytes": "convert",
    "DEFAULT_ACTIVATION_SCALE_UB": "formats",
    "LinearFormat": "formats",
    "Fp8Linear": "layers",
    "Int8Linear": "layers",
    "QuantizedLinear": "layers",
    "W8A8Linear": "layers",
    "quantized_linears": "layers",
    "load_any_format": "loading",
    "ALL_LINEARS": "policy",
    "LLAMA3_FP8": "policy",
    "QuantPolicy": "policy",
}


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'neuron_llm.quant' has no attribute {name!r}")
    return getattr(importlib.import_module(f"neuron_llm.quant.{module}"), name)


__all__ = list(_EXPORTS)

"""Quantized checkpoints in the compressed-tensors layout, which llm-compressor writes and vLLM reads.

``config.json`` carries a ``quantization_config`` such as::

    {"quant_method": "compressed-tensors", "format": "pack-quantized",
     "quantization_status": "compressed", "kv_cache_scheme": null,
     "config_groups": {"group_0": {"targets": ["Linear"], "format": "pack-quantized",
         "weights": {"num_bits": 8, "type": "int", "symmetric": true, "strategy": "channel",
                     "group_size": null, "dynamic": false},
         "input_activations": null, "output_activations": null}},
     "ignore": ["lm_head", "model.layers.0.self_attn.q_proj", ...]}

and the safetensors hold, for each quantized linear ``<m>``:

    int8 W8A16, "pack-quantized" (written; llm-compressor's choice for W8A16, the one vLLM runs):
        <m>.weight_packed int32 [out, ceil(in / 4)], <m>.weight_shape int64 [2], <m>.weight_scale
    int8, "naive-quantized" / "int-quantized" (read): <m>.weight int8 [out, in], <m>.weight_scale
    fp8 W8A8, "float-quantized" (or "naive-quantized", read): <m>.weight float8_e4m3fn [out, in],
        <m>.weight_scale [out, 1]
    int8 W8A8, "int-quantized" (llm-compressor's choice, the one vLLM runs): <m>.weight int8
        [out, in], <m>.weight_scale [out, 1]; its input_activations are dynamic per-token int

``weight_scale`` is [out, 1] per channel or [out, groups] per group; we write float32. The
fp8 activation bound has no field in compressed-tensors (its argument models forbid extra
keys); it is written as the top-level ``activation_scale_ub`` (the name vLLM's fbgemm_fp8
config uses), which other readers ignore. A checkpoint without it runs fp8 activations
unbounded, as vLLM would run it.
"""

from __future__ import annotations

import functools
import json
import math
import re
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from neuron_llm.config import ModelConfig, hf_rope_scaling
from neuron_llm.layers.linear import Linear
from neuron_llm.loader.hf_dir import CONFIG_FILE, GENERATION_CONFIG_FILE, SINGLE_WEIGHTS_FILE, read_json
from neuron_llm.loader.tokenizer import CHAT_TEMPLATES_DIR, has_tokenizer_files
from neuron_llm.loader.weights import TensorSource, save_safetensors
from neuron_llm.output_dir import written_whole
from neuron_llm.quant.formats import LinearFormat
from neuron_llm.quant.layers import Int8Linear, quantized_linears
from neuron_llm.quant.packing import pack_int8, packed_columns, unpack_int8
from neuron_llm.quant.policy import LM_HEAD

QUANT_METHOD = "compressed-tensors"
PACK_QUANTIZED = "pack-quantized"
FLOAT_QUANTIZED = "float-quantized"
MIXED_PRECISION = "mixed-precision"
INT_QUANTIZED = "int-quantized"
_ZERO_POINTS = (".weight_zero_point", ".input_zero_point")
_INT8_READ_FORMATS = (PACK_QUANTIZED, "naive-quantized", INT_QUANTIZED)
# llm-compressor wrote fp8 as "naive-quantized" until mid-2024, and still does for mixed schemes.
_FP8_READ_FORMATS = (FLOAT_QUANTIZED, "naive-quantized")
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)


@dataclass(frozen=True)
class SchemeGroup:
    """One of ``config_groups``: the modules it targets and their format."""

    targets: tuple[str, ...]
    format: LinearFormat


@dataclass(frozen=True)
class CheckpointQuantization:
    """What a checkpoint's ``quantization_config`` says about each linear."""

    groups: tuple[SchemeGroup, ...]
    ignore: tuple[str, ...] = ()

    def format_of(self, name: str, module_class: str = "Linear") -> LinearFormat | None:
        """The format the checkpoint stores the module ``name`` (of transformers' class
        ``module_class``) in; None for 16-bit."""
        if any(_target_matches(target, name, module_class) for target in self.ignore):
            return None
        for target, fmt in self._ranked_targets:
            if _target_matches(target, name, module_class):
                return fmt
        return None

    @functools.cached_property
    def _ranked_targets(self) -> list[tuple[str, LinearFormat]]:
        # compressed-tensors' precedence (``apply_quantization_config``): a target repeated in a
        # later group takes that group's scheme; an exact name beats a regex (in sorted order),
        # which beats the class "Linear".
        schemes = {target: group.format for group in self.groups for target in group.targets}
        return [(t, schemes[t]) for t in sorted(schemes, key=lambda t: (t == "Linear", t.startswith("re:"), t))]


def _target_matches(target: str, name: str, module_class: str) -> bool:
    # compressed-tensors' rules: "re:" prefixes a regex matched at the start of the name, a
    # class name matches modules of that class, else the target is an exact module name.
    if target.startswith("re:"):
        return re.match(target.removeprefix("re:"), name) is not None
    return target == module_class or target == name


def read_quantization_config(model_dir: Path) -> CheckpointQuantization | None:
    """The quantization of the Hugging Face directory ``model_dir``; None when it is not quantized."""
    raw = read_json(model_dir / CONFIG_FILE)
    if not isinstance(raw, dict):
        return None
    # llm-compressor's checkpoints of 2024 name it compression_config (vLLM reads either).
    key = next((key for key in ("quantization_config", "compression_config") if raw.get(key) is not None), None)
    if key is None:
        return None
    try:
        return parse_quantization_config(raw[key])
    except ValueError as e:
        read_as = "" if key == "quantization_config" else f" (read from {key})"
        raise ValueError(f"{model_dir / CONFIG_FILE}: {e}{read_as}") from e


def parse_quantization_config(raw: dict[str, Any]) -> CheckpointQuantization:
    """Read a compressed-tensors ``quantization_config`` dict.

    Raises ``ValueError`` naming the field of anything we do not run: another quant_method,
    KV-cache or output quantization, compressed sparse weights, weight transforms, asymmetric
    or non-8-bit weights, activation quantization other than dynamic symmetric 8-bit per token
    (int beside int weights, float beside fp8 weights), activation reordering.
    """
    method = raw.get("quant_method")
    if method != QUANT_METHOD:
        raise ValueError(f"quantization_config.quant_method={method!r}: only {QUANT_METHOD!r} checkpoints are read")
    if raw.get("kv_cache_scheme") is not None:
        raise ValueError("quantization_config.kv_cache_scheme: KV-cache quantization is not implemented")
    sparsity = raw.get("sparsity_config")
    if sparsity is not None and (not isinstance(sparsity, dict) or sparsity.get("format", "dense") != "dense"):
        # Dense-stored sparse weights load as they are; compressed ones would be read as garbage.
        found = sparsity.get("format") if isinstance(sparsity, dict) else sparsity
        raise ValueError(f"quantization_config.sparsity_config: format {found!r} is not read, only 'dense'")
    transform = raw.get("transform_config")
    # compressed-tensors writes an empty one ({}) into every checkpoint it saves.
    if transform is not None and (not isinstance(transform, dict) or transform.get("config_groups")):
        raise ValueError("quantization_config.transform_config: weight transforms (rotations) are not applied")
    groups = raw.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise ValueError("quantization_config.config_groups: must be a non-empty object")
    top_format = raw.get("format")
    ub = raw.get("activation_scale_ub")
    if ub == math.inf:
        ub = None  # no bound, as our quantize wrote it (Infinity, outside JSON) before refusing it
    parsed = tuple(_parse_group(name, group, top_format, ub) for name, group in groups.items())
    return CheckpointQuantization(parsed, tuple(raw.get("ignore") or ()))


def _parse_group(name: str, group: Any, top_format: str | None, activation_scale_ub: float | None) -> SchemeGroup:
    where = f"quantization_config.config_groups.{name}"
    if not isinstance(group, dict):
        raise ValueError(f"{where}: preset scheme names are not read; expected an object with targets and weights")
    storage = group.get("format") or top_format
    weights = group.get("weights")
    inputs = group.get("input_activations")
    if group.get("output_activations") is not None:
        raise ValueError(f"{where}.output_activations: output quantization is not implemented")
    if not isinstance(weights, dict):
        raise ValueError(f"{where}.weights: missing; only weight-quantized schemes are read")
    _require_arg(weights, "num_bits", 8, where + ".weights")
    _require_arg(weights, "symmetric", True, where + ".weights")
    # "weight" (alias "static", llm-compressor's GPTQ default) reorders during calibration only
    # and stores no g_idx; "group" (alias "dynamic", or true in older configs) stores one.
    if weights.get("actorder") not in (None, False) and _lower(weights["actorder"]) not in ("weight", "static"):
        raise ValueError(
            f"{where}.weights.actorder={weights['actorder']!r}: activation reordering at run time (a g_idx) is "
            "not implemented"
        )
    strategy = _strategy(weights)
    kind = _lower(weights.get("type", "int"))
    if kind == "int":
        if storage not in _INT8_READ_FORMATS:
            raise ValueError(
                f"{where}: format {storage!r} for int8 weights is not one of {', '.join(_INT8_READ_FORMATS)}"
            )
        if inputs is not None:
            _check_token_inputs(inputs, "int", where + ".input_activations")
            if strategy != "channel":
                raise ValueError(f"{where}.weights.strategy={strategy!r}: W8A8 int8 weights need per-channel scales")
            fmt = LinearFormat("w8a8")
        elif strategy not in ("channel", "group"):
            raise ValueError(f"{where}.weights.strategy={strategy!r}: int8 weights need 'channel' or 'group'")
        else:
            group_size = weights.get("group_size") if strategy == "group" else None
            if strategy == "group" and not (type(group_size) is int and group_size > 0):
                raise ValueError(f"{where}.weights.group_size={group_size!r}: strategy 'group' needs a positive size")
            fmt = LinearFormat("int8", group_size=group_size)
    elif kind == "float":
        if storage not in _FP8_READ_FORMATS:
            raise ValueError(
                f"{where}: format {storage!r} for fp8 weights is not one of {', '.join(_FP8_READ_FORMATS)}"
            )
        if strategy != "channel":
            raise ValueError(f"{where}.weights.strategy={strategy!r}: fp8 weights need per-channel scales")
        if not isinstance(inputs, dict):
            raise ValueError(
                f"{where}.input_activations: fp8 weights with 16-bit activations (W8A16 fp8) are not implemented"
            )
        _check_token_inputs(inputs, "float", where + ".input_activations")
        fmt = LinearFormat("fp8", activation_scale_ub=activation_scale_ub)
    else:
        raise ValueError(f"{where}.weights.type={kind!r}: must be 'int' or 'float'")
    targets = group.get("targets")
    if not isinstance(targets, list) or not targets:
        raise ValueError(f"{where}.targets: must be a non-empty list")
    return SchemeGroup(tuple(targets), fmt)


def _require_arg(args: dict[str, Any], key: str, expected: object, where: str) -> None:
    defaults = {"num_bits": 8, "symmetric": True}
    value = args.get(key, defaults.get(key))
    if value != expected:
        raise ValueError(f"{where}.{key}={value!r}: only {expected!r} is implemented")


def _strategy(args: dict[str, Any]) -> str:
    # As compressed-tensors infers it when the strategy is left out.
    strategy = args.get("strategy")
    if strategy is not None:
        return _lower(strategy)
    group_size = args.get("group_size")
    if group_size is None:
        return "tensor"
    return "channel" if group_size == -1 else "group"


def _lower(value: Any) -> Any:
    # compressed-tensors' enums take any case ("INT", "Channel").
    return value.lower() if isinstance(value, str) else value


def _check_token_inputs(inputs: Any, kind: str, where: str) -> None:
    if not isinstance(inputs, dict):
        raise ValueError(f"{where}: must be an object")
    _require_arg(inputs, "num_bits", 8, where)
    _require_arg(inputs, "symmetric", True, where)
    # compressed-tensors' type defaults to int, as for weights.
    if _lower(inputs.get("type", "int")) != kind or _strategy(inputs) != "token" or inputs.get("dynamic") is not True:
        raise ValueError(f"{where}: only dynamic per-token {kind} activations (type {kind}, strategy token) are read")


def check_whole_groups(name: str, in_features: int, group_size: int | None) -> None:
    """Raise ``ValueError`` unless linear ``name``'s groups divide its input features: a short
    last group runs in our layers, but compressed-tensors cannot store it."""
    if group_size is not None and in_features % group_size:
        raise ValueError(
            f"{name}: in_features={in_features} is not a multiple of group_size={group_size}; "
            "compressed-tensors stores whole groups only: use a group size that divides it, or per-channel scales"
        )


def quantization_config_dict(model: nn.Module, whole_groups: bool = True) -> dict[str, Any]:
    """The compressed-tensors ``quantization_config`` describing ``model``'s quantized linears.

    One config group per format. With a single group it targets "Linear" and the ignore
    list names every other linear (llm-compressor's form); with several, each group names
    its modules. Raises ``ValueError`` when the model has no quantized linear, or, with
    ``whole_groups``, one whose groups do not divide its input features (a short last group,
    which our layers run but compressed-tensors cannot store).
    """
    by_format: dict[LinearFormat, list[str]] = {}
    for name, fmt in quantized_linears(model).items():
        if whole_groups:
            check_whole_groups(name, model.get_submodule(name).in_features, fmt.group_size)
        by_format.setdefault(fmt, []).append(name)
    if not by_format:
        raise ValueError("the model has no quantized linear to describe")
    groups = {}
    for index, (fmt, names) in enumerate(by_format.items()):
        groups[f"group_{index}"] = {
            "targets": ["Linear"] if len(by_format) == 1 else names,
            "weights": _weights_args(fmt),
            "input_activations": _input_args(fmt),
            "output_activations": None,
            "format": _storage(fmt),
        }
    storages = {group["format"] for group in groups.values()}
    config: dict[str, Any] = {
        "quant_method": QUANT_METHOD,
        "format": storages.pop() if len(storages) == 1 else MIXED_PRECISION,
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": [name for name, m in model.named_modules() if isinstance(m, Linear)],
        "kv_cache_scheme": None,
    }
    bounds = {fmt.activation_scale_ub for fmt in by_format if fmt.scheme == "fp8"}
    if len(bounds) > 1:
        raise ValueError(f"fp8 linears with different activation bounds {sorted(map(str, bounds))} cannot be written")
    if bounds and (bound := bounds.pop()) is not None:
        config["activation_scale_ub"] = bound
    return config


def _weights_args(fmt: LinearFormat) -> dict[str, Any]:
    strategy = "group" if fmt.group_size is not None else "channel"
    return _args(_kind(fmt), strategy, fmt.group_size, dynamic=False)


def _input_args(fmt: LinearFormat) -> dict[str, Any] | None:
    return None if fmt.scheme == "int8" else _args(_kind(fmt), "token", None, dynamic=True)


def _kind(fmt: LinearFormat) -> str:
    return "float" if fmt.scheme == "fp8" else "int"


def _args(kind: str, strategy: str, group_size: int | None, *, dynamic: bool) -> dict[str, Any]:
    return {
        "num_bits": 8,
        "type": kind,
        "symmetric": True,
        "strategy": strategy,
        "group_size": group_size,
        "dynamic": dynamic,
    }


def _storage(fmt: LinearFormat) -> str:
    return {"int8": PACK_QUANTIZED, "fp8": FLOAT_QUANTIZED, "w8a8": INT_QUANTIZED}[fmt.scheme]


def checkpoint_tensors(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors of ``model`` as a compressed-tensors checkpoint stores them, on the CPU.

    Unquantized floating-point tensors are cast to ``dtype``; quantized weights and their
    float32 scales are written as they are (int8 weights packed). A tied LM head is written
    once, as the embedding.
    """
    int8_modules = {name for name, m in model.named_modules() if isinstance(m, Int8Linear)}
    quantized = set(quantized_linears(model))
    tensors = {}
    for name, param in model.named_parameters():
        module_name, _, leaf = name.rpartition(".")
        tensor = param.detach().cpu()
        if module_name in int8_modules and leaf == "weight":
            tensors[f"{module_name}.weight_packed"] = pack_int8(tensor)
            tensors[f"{module_name}.weight_shape"] = torch.tensor(tensor.shape, dtype=torch.int64)
        elif module_name in quantized and leaf in ("weight", "weight_scale"):
            tensors[name] = tensor.contiguous()
        else:
            tensors[name] = tensor.to(dtype).contiguous()
    return tensors


class PackedInt8Source:
    """A pack-quantized weight read as the int8 [out, in] tensor it packs, slice by slice.

    A row-parallel shard asks for a block of columns: only the int32 words holding them are
    read, then unpacked.
    """

    def __init__(self, packed: TensorSource, shape: tuple[int, int], name: str) -> None:
        expected = (shape[0], packed_columns(shape[1]))
        if tuple(packed.shape) != expected:
            raise ValueError(f"{name}: packed shape {tuple(packed.shape)} does not hold weight_shape {shape}")
        self._packed = packed
        self.shape = shape

    def __getitem__(self, index: object) -> torch.Tensor:
        rows, columns = _row_and_column_slices(index, self.shape)
        first_word = columns.start // 4
        words = self._packed[rows, first_word : packed_columns(columns.stop)]
        return unpack_int8(words, columns.stop - columns.start, columns.start - 4 * first_word)


def _row_and_column_slices(index: object, shape: tuple[int, int]) -> tuple[slice, slice]:
    """``index`` (``...``, a row slice, or a (rows, columns) pair of slices) as two step-1 slices."""
    parts = () if index is Ellipsis else index if isinstance(index, tuple) else (index,)
    if len(parts) > 2 or not all(isinstance(p, slice) for p in parts):
        raise TypeError(f"a packed weight is read by slices only, not {index!r}")
    rows, columns = (*parts, slice(None), slice(None))[:2]
    bounds = [slice(*s.indices(size)) for s, size in ((rows, shape[0]), (columns, shape[1]))]
    if any(s.step != 1 for s in bounds):
        raise TypeError(f"a packed weight is read by contiguous slices only, not {index!r}")
    return bounds[0], bounds[1]


def adapt_checkpoint_weights(weights: Iterable[tuple[str, TensorSource]]) -> Iterator[tuple[str, TensorSource]]:
    """Offer a compressed-tensors checkpoint's tensors under the names our layers hold.

    ``<m>.weight_packed`` with ``<m>.weight_shape`` becomes ``<m>.weight`` (int8, unpacked
    as it is read); zero points, which compressed-tensors wrote for symmetric schemes before
    mid-2024, are checked to be zero and dropped; every other tensor passes through.
    """
    sources = dict(weights)  # sources are lazy: this reads names, not data
    for name, source in sources.items():
        if name.endswith(_ZERO_POINTS):
            if bool(source[...].any()):
                raise ValueError(
                    f"checkpoint tensor {name} holds non-zero zero points: asymmetric schemes are not read"
                )
            continue
        if name.endswith(".weight_shape"):
            continue
        if name.endswith(".weight_g_idx"):
            raise ValueError(
                f"checkpoint tensor {name}: activation reordering at run time (actorder 'group') is not implemented"
            )
        if not name.endswith(".weight_packed"):
            yield name, source
            continue
        base = name.removesuffix(".weight_packed")
        shape_source = sources.get(f"{base}.weight_shape")
        if shape_source is None:
            raise ValueError(f"checkpoint tensor {name} has no {base}.weight_shape beside it")
        rows, columns = (int(v) for v in shape_source[...].tolist())
        yield f"{base}.weight", PackedInt8Source(source, (rows, columns), name)


def hf_config_dict(config: ModelConfig) -> dict[str, Any]:
    """A Hugging Face Llama ``config.json`` dict for ``config`` (for models read from GGUF)."""
    eos = list(config.eos_token_ids)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None if config.rope_scaling is None else hf_rope_scaling(config.rope_scaling),
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
    }


def save_quantized_checkpoint(
    model: nn.Module,
    config: ModelConfig,
    out_dir: Path,
    *,
    source: Path,
    tokenizer: PreTrainedTokenizerBase | None,
    dtype: torch.dtype = torch.bfloat16,
) -> None:
    """Write the quantized ``model`` to ``out_dir`` as a Hugging Face directory.

    The config, generation config and tokenizer are ``write_model_files``'s. Unquantized
    tensors are written in ``dtype``. ``out_dir`` must be absent or empty; it is written whole
    (``written_whole``), so an interrupted save leaves nothing that loads.
    """
    if not quantized_linears(model):
        raise ValueError("the model has no quantized linear to describe")
    hf_config = model_config_dict(model, config, source, dtype)  # raises before the directory is made
    with written_whole(out_dir, "quantizing", last="config.json") as building:
        save_safetensors(checkpoint_tensors(model, dtype), building / SINGLE_WEIGHTS_FILE)
        write_model_files(building, hf_config, source, tokenizer)


def model_config_dict(
    model: nn.Module, config: ModelConfig, source: Path, dtype: torch.dtype, whole_groups: bool = True
) -> dict[str, Any]:
    """The ``config.json`` of ``model``, read from ``source`` (a directory or GGUF file).

    A directory's own ``config.json`` is carried over; for a GGUF file it is rebuilt from
    ``config``. A model with quantized linears gets their compressed-tensors
    ``quantization_config`` (``quantization_config_dict``; ``whole_groups``: refusing a short
    last group, which a compressed-tensors checkpoint cannot store but our own layers can).
    """
    hf_config = read_json(source / CONFIG_FILE) if source.is_dir() else hf_config_dict(config)
    hf_config.pop("dtype", None)
    hf_config["torch_dtype"] = str(dtype).removeprefix("torch.")
    for key in ("quantization_config", "compression_config"):
        hf_config.pop(key, None)
    if quantized_linears(model):
        hf_config["quantization_config"] = quantization_config_dict(model, whole_groups)
    if LM_HEAD in quantized_linears(model):
        hf_config["tie_word_embeddings"] = False  # the quantized head is its own tensor now
    return hf_config


def write_model_files(
    out_dir: Path, hf_config: dict[str, Any], source: Path, tokenizer: PreTrainedTokenizerBase | None
) -> None:
    """Write ``hf_config`` as ``out_dir``'s ``config.json``, with the tokenizer and generation config.

    A source directory's generation config and tokenizer files are copied; otherwise (a GGUF
    file) ``tokenizer`` is saved.
    """
    (out_dir / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
    if source.is_dir():
        for name in (*_TOKENIZER_FILES, GENERATION_CONFIG_FILE):
            if (source / name).is_file():
                shutil.copyfile(source / name, out_dir / name)
        if (source / CHAT_TEMPLATES_DIR).is_dir():
            shutil.copytree(source / CHAT_TEMPLATES_DIR, out_dir / CHAT_TEMPLATES_DIR)
    if tokenizer is not None and not has_tokenizer_files(out_dir):
        tokenizer.save_pretrained(str(out_dir))

"""Reading a Llama GGUF file (llama.cpp's format): metadata to ``ModelConfig``, tensors to HF names.

Quantized tensors (Q4_1, Q8_0...) are dequantized to float32 with ``gguf.quants.dequantize``
and then cast to the requested dtype: the model runs the dequantized weights. llama.cpp's
converter reorders the rows of ``attn_q``/``attn_k`` within each head (its RoPE pairs
adjacent elements, where Hugging Face pairs element ``i`` with ``i + head_dim / 2``); we undo
that reordering so the weights fit our (Hugging Face style) rotary embedding.
"""

from __future__ import annotations

import functools
import importlib.metadata
import math
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import gguf
import numpy as np
import torch

from neuron_llm.config import LinearRopeScaling, Llama3RopeScaling, ModelConfig, RopeScaling, YarnRopeScaling
from neuron_llm.layers.rotary import inverse_frequencies
from neuron_llm.loader.weights import TensorSource

_TOP_LEVEL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# llama.cpp stores Llama 3.1 rope scaling as per-frequency divisors rather than metadata.
_ROPE_FREQS = "rope_freqs.weight"
_GGUF_VERSION = importlib.metadata.version("gguf")


def open_gguf(path: Path) -> gguf.GGUFReader:
    """Open ``path`` (memory-mapped); ``ValueError`` naming the file when it is not valid GGUF."""
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, OverflowError, UnicodeDecodeError) as e:
        # gguf's reader fails on a cut-off file with whatever indexing error it meets first.
        raise ValueError(
            f"{path} is not a valid GGUF file (corrupted, truncated, or newer than gguf {_GGUF_VERSION} reads): "
            f"{type(e).__name__}: {e}"
        ) from e
    if reader.byte_order == "S":
        # The reader would hand out byte-swapped arrays that gguf.quants reinterprets as native.
        raise ValueError(f"{path} is a GGUF file of the other byte order than this {sys.byteorder}-endian machine's")
    return reader


def has_tokenizer(reader: gguf.GGUFReader) -> bool:
    """Whether the GGUF file carries a tokenizer (llama.cpp writes its vocabulary as metadata;
    model "none" says it has none)."""
    field = reader.fields.get("tokenizer.ggml.model")
    return field is not None and field.contents() != "none"


class _Metadata:
    """Typed access to a GGUF file's key-value metadata, naming the file in every error."""

    def __init__(self, reader: gguf.GGUFReader, path: Path) -> None:
        self.reader = reader
        self.path = path

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def uniform(self, key: str, *, required: bool = False) -> Any:
        """``key``'s value, which llama.cpp may write as an array of one entry per layer: all must agree."""
        value = self.require(key) if required else self.get(key)
        if not isinstance(value, list):
            return value
        if not value or any(entry != value[0] for entry in value):
            raise ValueError(f"{self.path}: {key} varies across layers ({value}); every layer must have the same shape")
        return value[0]

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ValueError(f"{self.path} lacks the GGUF metadata key {key!r}")
        return value


def read_gguf_config(reader: gguf.GGUFReader, path: Path) -> ModelConfig:
    """Build the ``ModelConfig`` of the Llama GGUF ``reader`` (opened from ``path``).

    Raises ``ValueError`` naming the architecture when it is not ``llama``, or the option
    when it is one we do not implement (mixture of experts, partial rotary, rope scaling other
    than linear, Llama 3.1 and YaRN).
    """
    meta = _Metadata(reader, path)
    architecture = meta.require("general.architecture")
    if architecture != "llama":
        raise ValueError(
            f"{path}: unsupported GGUF architecture general.architecture={architecture!r}: only 'llama' is implemented"
        )
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{path} lacks the tensor 'token_embd.weight'")
    hidden_size = meta.require("llama.embedding_length")
    num_heads = meta.uniform("llama.attention.head_count", required=True)
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"{path}: llama.attention.head_count={num_heads!r} must be a positive integer")
    # llama.cpp's defaults: both lengths hidden_size / head_count unless the file says otherwise.
    head_dim = meta.get("llama.attention.key_length")
    if head_dim is None:
        head_dim = hidden_size // num_heads
    elif not isinstance(head_dim, int) or head_dim < 1:
        raise ValueError(f"{path}: llama.attention.key_length={head_dim!r} must be a positive integer")
    _refuse_unsupported_options(meta, tensors.values(), head_dim)
    rotary_dim = meta.get("llama.rope.dimension_count", head_dim)
    if rotary_dim != head_dim:
        raise ValueError(
            f"{path}: llama.rope.dimension_count={rotary_dim} differs from head_dim={head_dim}; "
            "partial rotary embeddings are not implemented"
        )
    rope_theta = float(meta.get("llama.rope.freq_base", 10000.0))
    context_length = meta.get("llama.context_length", 2048)
    rope_scaling = _rope_scaling(meta, tensors.get(_ROPE_FREQS), head_dim, rope_theta, context_length)
    num_kv_heads = meta.uniform("llama.attention.head_count_kv")  # 0 stays, for ModelConfig to refuse
    fields = dict(
        # The embedding's rows, not the token list: a checkpoint may pad its vocabulary.
        vocab_size=_row_major_shape(tensors["token_embd.weight"])[0],
        hidden_size=hidden_size,
        intermediate_size=meta.uniform("llama.feed_forward_length", required=True),
        num_hidden_layers=meta.require("llama.block_count"),
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads if num_kv_heads is None else num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=context_length,
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=_eos_token_ids(meta),
    )
    try:
        return ModelConfig(**fields)
    except ValueError as e:  # a shape ModelConfig refuses, named with the file
        raise ValueError(f"{path}: {e}") from e


def _refuse_unsupported_options(meta: _Metadata, tensors: Iterable[Any], head_dim: int) -> None:
    path = meta.path
    num_splits = meta.get("split.count", 1)
    if num_splits > 1:
        raise ValueError(
            f"{path} is one of {num_splits} parts of a split GGUF model, which is not read; "
            "merge them into one file (llama.cpp's `llama-gguf-split --merge`)"
        )
    num_experts = meta.get("llama.expert_count", 0)
    if num_experts:
        raise ValueError(f"{path}: llama.expert_count={num_experts}: mixture of experts is not implemented")
    value_length = meta.get("llama.attention.value_length") or head_dim
    if value_length != head_dim:
        raise ValueError(f"{path}: llama.attention.value_length={value_length} differs from key_length={head_dim}")
    for tensor in tensors:
        if tensor.name.endswith(".bias"):
            raise ValueError(f"{path}: tensor {tensor.name!r}: biases (attention_bias, mlp_bias) are not implemented")
        if not _is_readable(tensor.tensor_type):
            raise ValueError(
                f"{path}: tensor {tensor.name!r} is stored as {tensor.tensor_type.name}, "
                "which the gguf package cannot dequantize"
            )


@functools.cache
def _is_readable(tensor_type: gguf.GGMLQuantizationType) -> bool:
    """Whether the gguf package dequantizes ``tensor_type``: tried on one block of zeros."""
    _, block_bytes = gguf.GGML_QUANT_SIZES[tensor_type]
    try:
        gguf.quants.dequantize(np.zeros(block_bytes, dtype=np.uint8), tensor_type)
    except NotImplementedError:
        return False
    return True


_END_OF_GENERATION_TEXTS = frozenset(
    (
        *("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>"),
        *("<EOT>", "_<EOT>", "<｜end▁of▁sentence｜>", "<end_of_utterance>"),
    )
)
"""Tokens that end a generation whatever the metadata names or their type says, as in llama.cpp
(which retypes them as control tokens): an early Llama 3 Instruct file names only
<|end_of_text|> as EOS, yet its turns end with <|eot_id|>, and older converters typed a
fine-tune's <|im_end|> as user-defined."""

_LLAMA3_PRE_TOKENIZERS = frozenset(
    ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "tekken")
)
"""llama.cpp's byte-level pre-tokenizers (Llama 3's and Mistral Nemo's "tekken" among them)
whose vocabularies get BOS unless the file says otherwise, and ignore merges: a pre-token in
the vocabulary is one token, as Llama 3's tokenizer.json says."""


class TokenizerDefaults(NamedTuple):
    """What llama.cpp assumes of a GGUF vocabulary where the file is silent, and the parts of
    its rules that transformers' reader leaves out: BOS added to a SentencePiece or Llama 3
    vocabulary, a SentencePiece vocabulary's <s> and </s> at ids 1 and 2 and its space prefix,
    and Llama 3's ignored merges."""

    add_bos_token: bool
    bos_token_id: int | None
    eos_token_id: int | None
    add_space_prefix: bool | None = None
    """A SentencePiece vocabulary's: whether each run of text, at the start and after every
    special token, gets a leading space (true unless the file says not); None for others."""
    ignore_merges: bool = False
    add_eos_token: bool = False
    added_tokens: tuple[tuple[int, str, bool], ...] = ()
    """A byte-level vocabulary's control and user-defined tokens as (id, text, is control):
    llama.cpp matches them whole in a text, at their ids."""


def tokenizer_defaults(reader: gguf.GGUFReader, path: Path) -> TokenizerDefaults:
    meta = _Metadata(reader, path)
    model = meta.get("tokenizer.ggml.model")
    is_llama3 = model == "gpt2" and meta.get("tokenizer.ggml.pre") in _LLAMA3_PRE_TOKENIZERS
    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    if add_bos is None:
        add_bos = model == "llama" or is_llama3
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), _eos_token_id(meta)
    if model == "llama" and bos is None:
        bos = 1
    add_space_prefix = None
    if model == "llama":
        add_space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    added: tuple[tuple[int, str, bool], ...] = ()
    if model == "gpt2":
        kinds = {int(gguf.TokenType.CONTROL): True, int(gguf.TokenType.USER_DEFINED): False}
        tokens, types = meta.get("tokenizer.ggml.tokens", []), meta.get("tokenizer.ggml.token_type", [])
        added = tuple((i, text, kinds[kind]) for i, (text, kind) in enumerate(zip(tokens, types)) if kind in kinds)
    return TokenizerDefaults(bool(add_bos), bos, eos, add_space_prefix, is_llama3, add_eos, added)


def _eos_token_id(meta: _Metadata) -> int | None:
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return 2 if eos is None and meta.get("tokenizer.ggml.model") == "llama" else eos


def _eos_token_ids(meta: _Metadata) -> tuple[int, ...]:
    # End of turn (eot) and end of message (eom) end a generation as EOS does (Llama 3 chat).
    ids = [_eos_token_id(meta), meta.get("tokenizer.ggml.eot_token_id"), meta.get("tokenizer.ggml.eom_token_id")]
    ids += [i for i, text in enumerate(meta.get("tokenizer.ggml.tokens", [])) if text in _END_OF_GENERATION_TEXTS]
    return tuple(dict.fromkeys(i for i in ids if i is not None))


def _rope_scaling(
    meta: _Metadata, rope_freqs: Any, head_dim: int, theta: float, context_length: int
) -> RopeScaling | None:
    """The rope scaling llama.cpp applies to this file: Llama 3.1's as the ``rope_freqs`` tensor,
    or a scaling type with its factor.

    As in llama.cpp: the type defaults to linear when the key is absent, and "none" never
    scales, whatever the factor; the factor's older key is read only without the newer one;
    a llama file's YaRN runs with llama.cpp's defaults (betas 32 and 1, magnitude
    0.1 ln(factor) + 1), which reads no other YaRN key for this architecture. llama.cpp
    multiplies every rotation's cos and sin by ``rope.scaling.attn_factor``: YaRN's magnitude
    takes it; with any other scaling, a factor other than 1 is refused.
    """
    path = meta.path
    scaling_type = meta.get("llama.rope.scaling.type", "linear")
    factor = meta.get("llama.rope.scaling.factor")
    if factor is None:
        factor = meta.get("llama.rope.scale_linear")
    factor = None if scaling_type == "none" or factor in (None, 0.0, 1.0) else float(factor)
    attn_factor = float(meta.get("llama.rope.scaling.attn_factor", 1.0))
    if attn_factor != 1.0 and (scaling_type != "yarn" or factor is None or rope_freqs is not None):
        raise ValueError(
            f"{path}: llama.rope.scaling.attn_factor={attn_factor} scales the rotary embeddings, which is "
            "implemented with YaRN scaling only"
        )
    if rope_freqs is not None:
        if factor is not None:
            raise ValueError(
                f"{path}: llama.rope.scaling.type={scaling_type!r} with factor {factor} beside the {_ROPE_FREQS!r} "
                "tensor: both scalings at once are not implemented"
            )
        return _llama3_scaling(_dequantize(rope_freqs), head_dim, theta, path)
    if scaling_type not in ("none", "linear", "yarn"):
        raise ValueError(
            f"{path}: unsupported llama.rope.scaling.type={scaling_type!r}: only 'linear', 'yarn' and Llama 3.1 "
            f"scaling (stored as the {_ROPE_FREQS!r} tensor) are implemented"
        )
    if factor is None:
        return None  # YaRN without a factor interpolates nothing and scales by 1
    try:
        if scaling_type == "linear":
            return LinearRopeScaling(factor)
        return YarnRopeScaling(
            factor=factor,
            original_max_position_embeddings=meta.get("llama.rope.scaling.original_context_length") or context_length,
            attention_factor=YarnRopeScaling.default_attention_factor(factor) * attn_factor,
        )
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def _llama3_scaling(factors: np.ndarray, head_dim: int, theta: float, path: Path) -> Llama3RopeScaling | None:
    """Recover the Llama 3.1 scaling parameters from llama.cpp's per-frequency divisors.

    llama.cpp divides frequency ``i`` by ``factors[i]``: 1 for short wavelengths, ``factor``
    for long ones and ``1 / ((1 - s) / factor + s)`` in between, where
    ``s = (original_max_position_embeddings / wavelength - low_freq_factor) / (high - low)``
    is linear in ``1 / wavelength``. A line through the in-between points gives its slope and
    intercept; only two of the three context/low/high values follow from them, so we take
    ``low_freq_factor = 1`` as every Llama 3.x release does, then check the result reproduces
    every divisor.
    """
    factors = factors.astype(np.float64)
    inv_freq = inverse_frequencies(head_dim, theta, None).double().numpy()
    factor = float(factors.max())
    if factor <= 1.0 + 1e-6:
        if factors.min() >= 1.0 - 1e-6:
            return None  # every divisor 1: no scaling
        raise ValueError(
            f"{path}: {_ROPE_FREQS!r} divides frequencies by as little as {factors.min():g}: "
            "not Llama 3.1 rope scaling (divisors >= 1), the only one read"
        )
    in_between = (factors > 1.0 + 1e-4) & (factors < factor * (1 - 1e-4))
    if in_between.sum() < 2:
        raise ValueError(
            f"{path}: cannot recover Llama 3.1 rope scaling from {_ROPE_FREQS!r}: "
            f"it has {int(in_between.sum())} interpolated frequencies, at least 2 are needed"
        )
    smooth = (factor / factors[in_between] - 1) / (factor - 1)
    slope, intercept = np.polyfit(inv_freq[in_between] / (2 * math.pi), smooth, 1)
    context = int(round(-slope / intercept)) if intercept < 0 else 0
    try:
        scaling = Llama3RopeScaling(
            factor=round(factor, 6),
            low_freq_factor=1.0,
            # Rounded to undo float32 noise; the check below proves the rounded value exact enough.
            high_freq_factor=round(float(1.0 + context / slope), 6),
            original_max_position_embeddings=context,
        )
    except ValueError as e:
        raise ValueError(f"{path}: {_ROPE_FREQS!r} does not describe Llama 3.1 rope scaling: {e}") from e
    recovered = inverse_frequencies(head_dim, theta, scaling).double().numpy()
    if not np.allclose(recovered, inv_freq / factors, rtol=1e-4, atol=0):
        raise ValueError(f"{path}: {_ROPE_FREQS!r} does not describe Llama 3.1 rope scaling")
    return scaling


def hf_tensor_name(gguf_name: str) -> str | None:
    """The Hugging Face name of GGUF tensor ``gguf_name``; ``None`` for one with no counterpart."""
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in _TOP_LEVEL_NAMES:
        return f"{_TOP_LEVEL_NAMES[stem]}.{suffix}"
    match = _BLOCK_TENSOR.fullmatch(gguf_name)
    if match is None or match.group(2) not in _BLOCK_NAMES:
        return None
    layer, kind, suffix = match.groups()
    return f"model.layers.{layer}.{_BLOCK_NAMES[kind]}.{suffix}"


def unpermute_rotary_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row order: within each head, rows ``(pair, 2)`` back to ``(2, pair)``.

    llama.cpp's converter views each head's rows as ``[2, head_dim / 2]`` and transposes them to
    ``[head_dim / 2, 2]`` (interleaving the two rotary halves); this is the inverse.
    """
    out_features = weight.shape[0]
    head_dim = out_features // num_heads
    # weight: [num_heads, head_dim / 2, 2, in_features] -> [num_heads, 2, head_dim / 2, in_features]
    rows = weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:])
    return rows.transpose(1, 2).reshape(weight.shape)


def _row_major_shape(tensor: Any) -> tuple[int, ...]:
    # GGUF lists dimensions fastest-varying first; PyTorch lists them slowest first.
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))


def _dequantize(tensor: Any) -> np.ndarray:
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(_row_major_shape(tensor))


class GGUFSource:
    """One GGUF tensor, dequantized (and its rotary rows reordered) when it is read."""

    def __init__(self, tensor: Any, dtype: torch.dtype, rotary_heads: int | None) -> None:
        self._tensor = tensor
        self._dtype = dtype
        self._rotary_heads = rotary_heads
        self.shape: tuple[int, ...] = _row_major_shape(tensor)

    def __getitem__(self, index: object) -> torch.Tensor:
        array = np.ascontiguousarray(_dequantize(self._tensor), dtype=np.float32)
        if not array.flags.writeable:  # an unquantized tensor is a view of the read-only memory map
            array = array.copy()
        weight = torch.from_numpy(array)
        if self._rotary_heads is not None:
            weight = unpermute_rotary_rows(weight, self._rotary_heads)
        return weight[index].to(self._dtype)


def iter_gguf_weights(
    reader: gguf.GGUFReader, config: ModelConfig, dtype: torch.dtype, path: Path
) -> Iterator[tuple[str, TensorSource]]:
    """Yield ``(hf_name, source)`` for every weight of the Llama GGUF ``reader``.

    Raises ``ValueError`` naming a tensor that has no place in a Llama model.
    """
    for tensor in reader.tensors:
        if tensor.name == _ROPE_FREQS:
            continue  # folded into config.rope_scaling
        name = hf_tensor_name(tensor.name)
        if name is None:
            raise ValueError(f"{path}: GGUF tensor {tensor.name!r} has no counterpart in a Llama model")
        yield name, GGUFSource(tensor, dtype, _rotary_heads(name, config))


def _rotary_heads(hf_name: str, config: ModelConfig) -> int | None:
    if hf_name.endswith("q_proj.weight"):
        return config.num_attention_heads
    if hf_name.endswith("k_proj.weight"):
        return config.num_key_value_heads
    return None

"""Typed configuration, one dataclass per concern, each checked once in ``__post_init__``.

A bad value raises ``ValueError`` naming the field and the value. ``ModelConfig`` is read
from a Hugging Face ``config.json`` (``from_hf_config``) or from GGUF metadata
(``neuron_llm.loader.gguf_file``); anything we do not implement is refused by name.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from neuron_llm.sampling_params import is_finite_number

if TYPE_CHECKING:
    from neuron_llm.quant.config import QuantConfig

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype, *, or_auto: bool = False) -> torch.dtype:
    """Map a dtype name (``"bfloat16"``, ``"fp32"``...) or a torch dtype to a torch dtype;
    ``or_auto``: the caller also takes "auto", which the error then names."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype={dtype} is not supported; use one of float32, bfloat16, float16")
        return dtype
    if dtype not in _DTYPES:
        names = ["auto"] * or_auto + sorted(_DTYPES)
        raise ValueError(f"dtype={dtype!r} is not supported; use one of {names}")
    return _DTYPES[dtype]


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    """``parse_dtype``, where "auto" is bfloat16 on accelerators and float32 on the CPU, where
    bf16 matmuls are slow."""
    if dtype != "auto":
        return parse_dtype(dtype, or_auto=True)
    return torch.float32 if parse_device(device).type == "cpu" else torch.bfloat16


def parse_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device``; a ``ValueError`` when it names none."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        # torch-neuronx puts NeuronCores behind torch-xla's device.
        hint = " (a NeuronCore is the 'xla' device)" if str(device).lower().startswith("neuron") else ""
        raise ValueError(f"device={device!r} is not a valid torch device{hint}") from e


def require_visible(device: str | torch.device) -> torch.device:
    """``parse_device``, and a ``ValueError`` for a CUDA device this process cannot see (checked
    where a model is built, since a configuration may name a device of another machine)."""
    parsed = parse_device(device)
    if parsed.type == "cuda":
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if visible == 0:
            raise ValueError(f"device={device!r}: no CUDA device is visible (torch.cuda.is_available() is False)")
        if parsed.index is not None and parsed.index >= visible:
            raise ValueError(f"device={device!r}: only {visible} CUDA device(s) are visible")
    return parsed


def _require(condition: bool, name: str, value: Any, why: str) -> None:
    if not condition:
        raise ValueError(f"{name}={value!r}: {why}")


def _require_bool(config: Any, name: str) -> None:
    # "no" or "false" from a script or a JSON string is truthy: refused, not taken as True.
    value = getattr(config, name)
    _require(isinstance(value, bool), name, value, "must be a bool")


def as_token_ids(value: Any, key: str) -> tuple[int, ...]:
    """A config's ``key`` (one token id, a list of them, or null) as a tuple of ids."""
    ids = () if value is None else tuple(value) if isinstance(value, list) else (value,)
    _require(
        all(is_int(i) and i >= 0 for i in ids), key, value, "must be a token id (an integer >= 0) or a list of them"
    )
    return ids


def is_int(value: Any) -> bool:
    """A Python int that is not a bool (what a config field of counts holds, and JSON writes)."""
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1 frequency scaling (transformers' rope type "llama3")."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    rope_type: ClassVar[str] = "llama3"

    def __post_init__(self) -> None:
        _require(self.factor > 0, "rope_scaling.factor", self.factor, "must be > 0")
        _require(
            self.high_freq_factor > self.low_freq_factor > 0,
            "rope_scaling.high_freq_factor",
            self.high_freq_factor,
            f"must exceed low_freq_factor={self.low_freq_factor} > 0",
        )
        _require_context(self.original_max_position_embeddings)

    @property
    def attention_factor(self) -> float:
        return 1.0


@dataclass(frozen=True)
class LinearRopeScaling:
    """Position interpolation (rope type "linear"): every frequency divided by ``factor``, as
    long-context Llama 2 fine-tunes (Vicuna 16k, LongChat) were trained."""

    factor: float

    rope_type: ClassVar[str] = "linear"

    def __post_init__(self) -> None:
        _require(self.factor > 0, "rope_scaling.factor", self.factor, "must be > 0")

    @property
    def attention_factor(self) -> float:
        return 1.0


@dataclass(frozen=True)
class YarnRopeScaling:
    """YaRN (Peng et al. 2023; rope type "yarn"): frequencies that turn fewer than ``beta_slow``
    times over the original context are divided by ``factor``, those turning more than
    ``beta_fast`` times are kept, a linear ramp between; cos and sin are multiplied by
    ``attention_factor``."""

    factor: float
    original_max_position_embeddings: int
    attention_factor: float
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    """Round the ramp's ends to whole dimensions (transformers' default; llama.cpp always does)."""

    rope_type: ClassVar[str] = "yarn"

    def __post_init__(self) -> None:
        _require(self.factor > 0, "rope_scaling.factor", self.factor, "must be > 0")
        _require_context(self.original_max_position_embeddings)
        _require(self.attention_factor > 0, "rope_scaling.attention_factor", self.attention_factor, "must be > 0")
        _require(
            self.beta_fast >= self.beta_slow > 0,
            "rope_scaling.beta_fast",
            self.beta_fast,
            f"must be at least beta_slow={self.beta_slow} > 0",
        )
        _require(isinstance(self.truncate, bool), "rope_scaling.truncate", self.truncate, "must be a bool")

    @staticmethod
    def default_attention_factor(factor: float, mscale: float = 1.0) -> float:
        """YaRN's magnitude correction, 0.1 ln(factor) + 1 (eq. 21), with transformers' ``mscale``."""
        return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


RopeScaling = Llama3RopeScaling | LinearRopeScaling | YarnRopeScaling
"""How rotary frequencies are stretched beyond the pretraining context; None when they are not."""


def hf_rope_scaling(scaling: RopeScaling) -> dict[str, Any]:
    """``scaling`` as a Hugging Face config's ``rope_scaling`` entry (what ``_read_rope`` reads back)."""
    return {"rope_type": scaling.rope_type, **dataclasses.asdict(scaling)}


def _require_context(value: Any) -> None:
    name = "rope_scaling.original_max_position_embeddings"
    _require(is_int(value) and value > 0, name, value, "must be a positive integer")


# Llama config keys whose non-default values change the computation in ways we do not
# implement; each maps to the values we accept ("swish" is transformers' other name for SiLU).
# pretraining_tp is not among them: it only splits transformers' matmuls into the same sums.
_UNSUPPORTED_IF_SET = {
    "attention_bias": (False,),
    "mlp_bias": (False,),
    "hidden_act": ("silu", "swish"),
}


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            _require(is_int(value) and value > 0, name, value, "must be a positive integer")
        _require(
            self.num_attention_heads % self.num_key_value_heads == 0,
            "num_key_value_heads",
            self.num_key_value_heads,
            f"must divide num_attention_heads={self.num_attention_heads}",
        )
        _require_bool(self, "tie_word_embeddings")
        _require(self.head_dim % 2 == 0, "head_dim", self.head_dim, "must be even for rotary embeddings")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
            _require(is_number and value > 0, name, value, "must be a number > 0")
        bos = self.bos_token_id
        _require(bos is None or (is_int(bos) and bos >= 0), "bos_token_id", bos, "must be a token id or None")
        as_token_ids(list(self.eos_token_ids), "eos_token_ids")

    @property
    def max_context_len(self) -> int:
        """The longest sequence the model serves, as vLLM derives it: max_position_embeddings,
        times a linear scaling's factor, or a YaRN scaling's original context times its factor."""
        scaling = self.rope_scaling
        if isinstance(scaling, LinearRopeScaling):
            return int(self.max_position_embeddings * scaling.factor)
        if isinstance(scaling, YarnRopeScaling):
            return int(scaling.original_max_position_embeddings * scaling.factor)
        return self.max_position_embeddings

    def describe_context(self) -> str:
        """Where ``max_context_len`` comes from, for messages."""
        if self.max_context_len == self.max_position_embeddings:
            return f"max_position_embeddings={self.max_position_embeddings}"
        assert self.rope_scaling is not None
        return f"{self.max_context_len} tokens with its {self.rope_scaling.rope_type} rope scaling"

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build from the dict of a Hugging Face ``config.json`` (transformers 4.x or 5.x keys).

        Raises ``ValueError`` naming the architecture or option when it is not a Llama we run.
        """
        architectures = hf.get("architectures") or []
        model_type = hf.get("model_type")
        if model_type is None:
            # transformers' AutoConfig refuses such a config too.
            raise ValueError('config.json has no model_type (a Llama checkpoint\'s is "llama")')
        # "LLaMAForCausalLM": the early conversions' spelling (decapoda-research), read by
        # transformers through model_type and by vLLM as Llama.
        if model_type != "llama" or (
            architectures and architectures not in (["LlamaForCausalLM"], ["LLaMAForCausalLM"])
        ):
            raise ValueError(
                f"unsupported architecture {architectures or model_type!r} (model_type={model_type!r}): "
                "only LlamaForCausalLM is implemented"
            )
        for key, accepted in _UNSUPPORTED_IF_SET.items():
            if key in hf and hf[key] is not None and hf[key] not in accepted:
                names = " or ".join(map(repr, accepted))
                raise ValueError(f"unsupported Llama option {key}={hf[key]!r}: only {names} is implemented")
        num_heads, hidden_size = hf["num_attention_heads"], hf["hidden_size"]
        head_dim = hf.get("head_dim")
        if head_dim is None:
            # Checked here only because the division needs them; __post_init__ checks the rest.
            for name, value in (("num_attention_heads", num_heads), ("hidden_size", hidden_size)):
                _require(is_int(value) and value > 0, name, value, "must be a positive integer")
            head_dim = hidden_size // num_heads
        rope_theta, rope_scaling = _read_rope(hf)
        # Absent or null takes the default; 0 or "false" stay, for __post_init__ to refuse.
        num_kv_heads, tie = hf.get("num_key_value_heads"), hf.get("tie_word_embeddings")
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hidden_size,
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=num_heads,
            num_key_value_heads=num_heads if num_kv_heads is None else num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=False if tie is None else tie,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=as_token_ids(hf.get("eos_token_id"), "eos_token_id"),
        )

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> ModelConfig:
        """Read a Hugging Face ``config.json``."""
        with open(path) as f:
            try:
                hf = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON: {e}") from e
        if not isinstance(hf, dict):
            raise ValueError(f"{path} holds a JSON {type(hf).__name__}, not an object")
        try:
            return cls.from_hf_config(hf)
        except KeyError as e:
            raise ValueError(f"{path} lacks the required key {e.args[0]!r}") from e
        except (ValueError, TypeError) as e:  # TypeError: a value of the wrong JSON type
            raise ValueError(f"{path}: {e}") from e


def _read_rope(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """rope_theta and the scaling, as transformers resolves them (its ``standardize_rope_params``),
    but for one case: a config with both rope_scaling and rope_parameters (a 4.x scaling added
    to a 5.x config) and no top-level rope_theta keeps rope_parameters' theta, where
    transformers falls back to 10,000 and runs another model than the one saved."""
    # transformers 5 writes "rope_parameters" (theta inside); 4.x writes rope_theta + rope_scaling,
    # which transformers takes first when a config has both.
    params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    theta = (
        params.pop("rope_theta", None) or hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta")
    )
    theta = 10000.0 if theta is None else theta
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None  # transformers' default rotation ignores partial_rotary_factor too
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1.0):
        raise ValueError(f"partial_rotary_factor={partial!r}: partial rotary embeddings are not implemented")
    # A top-level key wins over the one in the rope parameters, as in transformers 5.
    context = hf.get("original_max_position_embeddings") or params.get(
        "original_max_position_embeddings", hf.get("max_position_embeddings", 2048)
    )
    if isinstance(context, float) and context.is_integer():
        context = int(context)
    if rope_type == "linear":
        return theta, LinearRopeScaling(_number(params, "factor", rope_type))
    if rope_type == "llama3":
        return theta, Llama3RopeScaling(
            factor=_number(params, "factor", rope_type),
            low_freq_factor=_number(params, "low_freq_factor", rope_type),
            high_freq_factor=_number(params, "high_freq_factor", rope_type),
            original_max_position_embeddings=context,
        )
    if rope_type == "yarn":
        return theta, _read_yarn(params, context, hf.get("max_position_embeddings", 2048))
    if rope_type == "dynamic":
        # transformers' dynamic NTK rotates as plain RoPE up to max_position_embeddings, and beyond
        # it re-rotates every cached key for the new length, which a paged cache, keeping each
        # key as written, cannot: served exactly, up to there (vLLM approximates it throughout).
        _warn_once(
            f"rope_scaling 'dynamic' is served as transformers computes it up to "
            f"max_position_embeddings={hf.get('max_position_embeddings')} (plain RoPE); longer sequences are refused"
        )
        return theta, None
    raise ValueError(
        f"unsupported rope_scaling type {rope_type!r}: only 'linear', 'llama3', 'yarn' and 'dynamic' are implemented"
    )


@functools.cache
def _warn_once(message: str) -> None:
    # A model's config is read by the LLM and again by its worker: one warning is enough.
    logger.warning(message)


def _number(params: dict[str, Any], key: str, rope_type: str, default: float | None = None) -> float:
    """``params[key]`` as a float; ``default`` when it is absent or null, if one is given."""
    value = params.get(key)
    if value is None and default is not None:
        return default
    if key not in params:
        raise ValueError(f"rope_scaling of type {rope_type!r} lacks {key!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"rope_scaling.{key}={value!r}: must be a number")
    return float(value)


def _read_yarn(params: dict[str, Any], context: int, max_position_embeddings: int) -> YarnRopeScaling:
    # transformers derives a null factor from the two contexts, and takes a null or zero beta
    # and a null or zero truncate as it does a missing one.
    factor = _number(params, "factor", "yarn", default=max_position_embeddings / context if context else None)
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        magnitude = YarnRopeScaling.default_attention_factor
        if mscale and mscale_all_dim:
            attention_factor = magnitude(factor, float(mscale)) / magnitude(factor, float(mscale_all_dim))
        else:
            attention_factor = magnitude(factor)
    truncate = params.get("truncate", True)
    return YarnRopeScaling(
        factor=factor,
        original_max_position_embeddings=context,
        attention_factor=_number({"attention_factor": attention_factor}, "attention_factor", "yarn"),
        beta_fast=_number(params, "beta_fast", "yarn", default=32.0) or 32.0,
        beta_slow=_number(params, "beta_slow", "yarn", default=1.0) or 1.0,
        truncate=bool(truncate) if truncate in (None, 0, 1) else truncate,
    )


_A_YEAR_S = 365 * 24 * 3600
"""The longest wait for the other ranks accepted: far below where ``timedelta`` overflows."""


@dataclass(frozen=True)
class ParallelConfig:
    """How the model is split across devices."""

    tensor_parallel_size: int = 1
    """Number of devices each layer is split across (a process each on the CPU and CUDA; one
    process over all its devices on the XLA device); 1 runs unsplit."""
    distributed_timeout: float = 600.0
    """Seconds rank 0 waits for the other ranks: to start, to finish loading once it has, and
    in every collective, so a rank that hangs fails the step after this long."""

    def __post_init__(self) -> None:
        _require(
            is_int(self.tensor_parallel_size) and self.tensor_parallel_size >= 1,
            "tensor_parallel_size",
            self.tensor_parallel_size,
            "must be an integer >= 1",
        )
        _require(
            is_finite_number(self.distributed_timeout) and 0 < self.distributed_timeout <= _A_YEAR_S,
            "distributed_timeout",
            self.distributed_timeout,
            f"must be a number of seconds > 0, at most a year ({_A_YEAR_S})",
        )

    def check_model(self, model: ModelConfig) -> None:
        """Refuse a TP degree the model's shape cannot be split by."""
        tp = self.tensor_parallel_size
        if model.num_attention_heads % tp:
            raise ValueError(f"tensor_parallel_size={tp} must divide num_attention_heads={model.num_attention_heads}")
        kv = model.num_key_value_heads
        if kv % tp and tp % kv:
            raise ValueError(
                f"tensor_parallel_size={tp} and num_key_value_heads={kv}: one must divide the other "
                "(KV heads are split when TP <= KV heads, replicated when TP > KV heads)"
            )
        if model.intermediate_size % tp:
            raise ValueError(f"tensor_parallel_size={tp} must divide intermediate_size={model.intermediate_size}")


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache."""

    block_size: int = 16
    """Tokens per KV block; 16 as in vLLM: small enough to waste little, large enough to gather well."""
    num_kv_blocks: int | None = None
    """Blocks per layer; None sizes the pool from ``memory_fraction`` (or max_model_len when unknown)."""
    memory_fraction: float = 0.9
    """Fraction of device memory the weights and KV pool may use (vLLM's gpu_memory_utilization)."""
    enable_prefix_caching: bool = True
    """Reuse KV blocks of an identical prompt prefix."""

    def __post_init__(self) -> None:
        _require(
            is_int(self.block_size) and self.block_size > 0 and self.block_size & (self.block_size - 1) == 0,
            "block_size",
            self.block_size,
            "must be a positive power of two",
        )
        _require(
            self.num_kv_blocks is None or (is_int(self.num_kv_blocks) and self.num_kv_blocks > 1),
            "num_kv_blocks",
            self.num_kv_blocks,
            "must be None or an integer > 1",
        )
        _require(
            is_finite_number(self.memory_fraction) and 0 < self.memory_fraction <= 1,
            "memory_fraction",
            self.memory_fraction,
            "must be a number in (0, 1]",
        )
        _require_bool(self, "enable_prefix_caching")


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one engine step and of one request."""

    max_model_len: int | None = None
    """Longest prompt plus output, in tokens; None takes the model's context (``ModelConfig.max_context_len``)."""
    max_num_seqs: int = 64
    """Most sequences in one step."""
    max_num_batched_tokens: int = 2048
    """Token budget of one step (decodes plus prefill chunks)."""
    enable_chunked_prefill: bool = True
    """Split long prompts across steps so decodes are never starved."""
    async_scheduling: bool | None = None
    """Schedule and launch each step before reading the tokens of the one before, so the
    device never waits for the host's bookkeeping; a stop token or string is then seen one
    step late (the extra token is dropped). None turns it on where it was measured to pay: one
    CUDA device (with tensor parallelism, rank 0 also broadcasts its sampled ids each step)."""

    def __post_init__(self) -> None:
        _require(
            self.max_model_len is None or (is_int(self.max_model_len) and self.max_model_len > 0),
            "max_model_len",
            self.max_model_len,
            "must be None or a positive integer",
        )
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            _require(is_int(value) and value >= 1, name, value, "must be an integer >= 1")
        _require_bool(self, "enable_chunked_prefill")
        _require(
            self.async_scheduling is None or isinstance(self.async_scheduling, bool),
            "async_scheduling",
            self.async_scheduling,
            "must be a bool",
        )


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding: a proposer offers tokens, the model checks them in one step.

    Lossless (Leviathan et al., 2023, https://arxiv.org/abs/2211.17192): greedy output is
    the plain decode's and sampled output keeps the model's distribution. The proposer is
    n-gram prompt lookup (vLLM's "ngram"): the tokens that followed an earlier occurrence of
    the sequence's final n tokens, for n from ``prompt_lookup_max`` down to ``prompt_lookup_min``
    (``neuron_llm.engine.speculative.NgramProposer``); or, with ``model``, a smaller model
    sharing the tokenizer, decoding greedily (vLLM's "draft_model",
    ``neuron_llm.engine.speculative.DraftModelProposer``).
    """

    num_speculative_tokens: int
    """Most tokens proposed per sequence and step (the step computes up to this many + 1)."""
    method: str = "ngram"
    """"ngram" or "draft_model" (the default when ``model`` is given)."""
    prompt_lookup_max: int = 4
    """Longest suffix looked up."""
    prompt_lookup_min: int = 1
    """Shortest suffix looked up; a sequence with no match of this length gets no proposal."""
    model: str | None = None
    """The draft model (a path, as ``LLM``'s ``model``), for "draft_model"."""
    quantization: str | None = None
    """The draft model's quantization preset, if any (a model's own int8 copy can draft for it)."""
    draft_tensor_parallel_size: int | None = None
    """The draft's tensor parallelism: 1 (None means 1 too). Under tensor parallelism the draft
    runs whole on rank 0's device, in the engine's process (vLLM shards it as the model is); on
    the XLA device, whole on every device."""

    def __post_init__(self) -> None:
        _require(self.method in ("ngram", "draft_model"), "method", self.method, "must be 'ngram' or 'draft_model'")
        _require(
            self.model is None or (isinstance(self.model, (str, os.PathLike)) and str(self.model) != ""),
            "model",
            self.model,
            "must be the draft model's path",
        )
        _require(
            self.quantization is None or isinstance(self.quantization, str),
            "quantization",
            self.quantization,
            "must be a preset name",
        )
        is_draft = self.method == "draft_model"
        _require(
            (self.model is not None) == is_draft,
            "model",
            self.model,
            "is the draft model of method 'draft_model', which needs one" if is_draft else "needs method 'draft_model'",
        )
        _require(self.quantization is None or is_draft, "quantization", self.quantization, "is the draft model's")
        if (draft_tp := self.draft_tensor_parallel_size) is not None:
            _require(is_draft, "draft_tensor_parallel_size", draft_tp, "is the draft model's")
            why = "must be 1: the draft runs whole on rank 0's device"
            _require(is_int(draft_tp) and draft_tp == 1, "draft_tensor_parallel_size", draft_tp, why)
        if is_draft:
            for name in ("prompt_lookup_max", "prompt_lookup_min"):
                value = getattr(self, name)
                default = type(self).__dataclass_fields__[name].default
                _require(value == default, name, value, "is for method 'ngram'; a draft model looks nothing up")
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"):
            value = getattr(self, name)
            _require(is_int(value) and value >= 1, name, value, "must be an integer >= 1")
        _require(
            self.prompt_lookup_min <= self.prompt_lookup_max,
            "prompt_lookup_min",
            self.prompt_lookup_min,
            f"must be <= prompt_lookup_max={self.prompt_lookup_max}",
        )

    @classmethod
    def parse(cls, value: SpeculativeConfig | dict[str, Any] | str | None) -> SpeculativeConfig | None:
        """From vLLM's forms: a dict, its JSON text (the command line's), or None (off)."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config={value!r} is not JSON: {e}") from e
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be a JSON object, not {type(value).__name__}")
        unknown = sorted(set(value) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"speculative_config: unknown key(s) {unknown}; known: {sorted(cls.__dataclass_fields__)}")
        if "num_speculative_tokens" not in value:
            raise ValueError("speculative_config needs num_speculative_tokens")
        if "model" in value and "method" not in value:
            value = {**value, "method": "draft_model"}
        try:
            return cls(**value)
        except ValueError as e:
            raise ValueError(f"speculative_config.{e}") from e


SAMPLING_FEATURES = ("logit_bias", "logprobs", "min_tokens", "penalties", "prompt_logprobs")
"""The optional parts of a step's sampling graph on the XLA device: each changes its shapes.
"logit_bias" is any row's additive bias: its logit_bias, allowed_token_ids, bad_words or grammar."""


def parse_names(text: str) -> list[str]:
    """Comma-separated names (a command line's, an environment variable's) as a list."""
    return [name.strip() for name in text.split(",") if name.strip()]


def parse_sampling_features(text: str) -> list[str]:
    """Comma-separated feature names as a list; ``ValueError`` naming any not in ``SAMPLING_FEATURES``."""
    names = parse_names(text)
    _check_feature_names(names)
    return names


def parse_context_buckets(text: str) -> list[int]:
    """Comma-separated context lengths (a command line's, an environment variable's) as a list."""
    try:
        return [int(length) for length in text.split(",") if length.strip()]
    except ValueError:
        raise ValueError(f"context_buckets={text!r}: must be comma-separated integers, e.g. 512,1024,2048") from None


def _check_feature_names(names: Sequence[str]) -> None:
    unknown = sorted(set(names) - set(SAMPLING_FEATURES))
    if unknown:
        raise ValueError(f"sampling_features: unknown {unknown}; choose from {', '.join(SAMPLING_FEATURES)}")


@dataclass(frozen=True)
class DeviceConfig:
    """Where and in what precision the model runs."""

    device: str = "cpu"
    """A torch device string: "cpu", "cuda", "cuda:1" (a ``torch.device`` is taken and stored as one)."""
    dtype: torch.dtype = torch.float32
    """Activation and 16-bit weight dtype (a name such as "bfloat16" is taken and stored as the dtype)."""
    backend: str | None = None
    """The ops backend ("torch", "cuda", "neuron"); None picks the device's default."""
    enforce_eager: bool = False
    """On CUDA, run every step eagerly instead of replaying CUDA graphs."""
    max_prefill_graph_tokens: int = 4096
    """On CUDA, prefill and mixed steps padded to at most this many tokens replay CUDA graphs
    too (decode steps always do); longer ones run eagerly: there the host's launches cost the
    step little (2% at 4,096 tokens on an H200) and each graph holds more memory. 0: only
    decode steps replay graphs."""
    sampling_features: tuple[str, ...] = ()
    """On the XLA device, the optional parts of ``SAMPLING_FEATURES`` whose graphs warm-up
    compiles for every bucket, in each combination (2^k graphs a bucket for k features); a
    step that uses another compiles its graph then, with a warning. Stored sorted."""
    context_buckets: tuple[int, ...] | None = None
    """On the XLA device, the context lengths (tokens) a step's block tables are padded to:
    the smallest holding the step's longest sequence, ``max_model_len`` added as the last.
    Attention there computes every key of the table's width, so a step over short contexts
    costs what they need, not ``max_model_len``; each length multiplies the graphs warm-up
    compiles. None: ``max_model_len`` / 4, / 16 and / 64, none below 512
    (``neuron_llm.buckets.context_lengths``). Stored sorted."""
    nki_kernels: tuple[str, ...] = ()
    """On the XLA device with the Neuron SDK installed, the NKI kernels of
    ``nki_kernels.KERNELS`` that replace their XLA forms (not run on a NeuronCore yet).
    Stored sorted."""

    def __post_init__(self) -> None:
        device = parse_device(self.device)
        device_type = device.type
        if device_type not in ("cpu", "cuda", "xla"):
            raise ValueError(f"device={self.device!r}: neuron-llm runs on cpu, cuda, cuda:N or xla (Neuron)")
        # Frozen: normalised through object.__setattr__, so that every reader gets one form.
        object.__setattr__(self, "device", str(device))
        object.__setattr__(self, "dtype", parse_dtype(self.dtype))
        _require_bool(self, "enforce_eager")
        features = self.sampling_features
        if isinstance(features, str) or not all(isinstance(f, str) for f in features):
            raise ValueError(f"sampling_features={features!r}: must be a list of names from {SAMPLING_FEATURES}")
        _check_feature_names(features)
        if features and device_type != "xla":
            raise ValueError(
                f"sampling_features={list(features)!r} on device={self.device!r}: only the XLA device compiles "
                "a sampling graph per feature set; elsewhere every feature runs without compiling"
            )
        object.__setattr__(self, "sampling_features", tuple(sorted(set(features))))
        if (lengths := self.context_buckets) is not None:
            if not isinstance(lengths, (list, tuple)) or not all(is_int(n) and n >= 1 for n in lengths):
                shown = list(lengths) if isinstance(lengths, tuple) else lengths
                raise ValueError(f"context_buckets={shown!r}: must be a list of context lengths >= 1")
            if device_type != "xla":
                raise ValueError(
                    f"context_buckets={list(lengths)!r} on device={self.device!r}: only the XLA device pads "
                    "block tables to context lengths; attention elsewhere reads each sequence's own keys"
                )
            object.__setattr__(self, "context_buckets", tuple(sorted(set(lengths))))
        if (kernels := self.nki_kernels) is None:
            object.__setattr__(self, "nki_kernels", ())
        elif kernels:
            if device_type != "xla":
                raise ValueError(f"nki_kernels={kernels!r} on device={self.device!r}: NKI kernels run on Neuron")
            import nki_kernels

            object.__setattr__(self, "nki_kernels", nki_kernels.check(kernels))
        if not is_int(self.max_prefill_graph_tokens) or self.max_prefill_graph_tokens < 0:
            raise ValueError(f"max_prefill_graph_tokens={self.max_prefill_graph_tokens!r} must be an integer >= 0")
        from neuron_llm.backends import BACKEND_NAMES

        if self.backend is not None and self.backend not in BACKEND_NAMES:
            raise ValueError(f"backend={self.backend!r}: must be one of {', '.join(BACKEND_NAMES)}")
        if self.backend == "cuda" and device_type != "cuda":
            raise ValueError(f"backend='cuda' runs on a CUDA device, not device={self.device!r}")
        if (self.backend == "neuron") != (device_type == "xla") and self.backend is not None:
            raise ValueError(
                f"backend={self.backend!r} with device={self.device!r}: the neuron backend is the XLA device's"
            )

    @property
    def backend_name(self) -> str:
        from neuron_llm.backends import default_backend_name

        return self.backend or default_backend_name(self.device)


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine is built from; each component takes only the part it uses."""

    model: ModelConfig
    device: DeviceConfig = field(default_factory=DeviceConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    quantization: str | None = None
    """A preset of ``neuron_llm.quant.PRESETS`` to quantize the weights to on load, or None."""
    speculative: SpeculativeConfig | None = None
    """Speculative decoding, or None (off)."""

    def __post_init__(self) -> None:
        self.parallel.check_model(self.model)
        if self.quantization is not None:
            from neuron_llm.quant.config import resolve_quant_config

            self._check_sharded_quantization(resolve_quant_config(self.quantization))  # raises naming the presets
        on_xla = torch.device(self.device.device).type == "xla"
        if on_xla and self.parallel.tensor_parallel_size > 1:
            from neuron_llm.xla.spmd import check_shape

            check_shape(self.parallel.tensor_parallel_size, self.model.num_key_value_heads)
            if self.device.nki_kernels:
                # A custom call has no rule telling XLA's partitioner how to split it.
                raise ValueError(
                    f"nki_kernels={list(self.device.nki_kernels)!r} with tensor_parallel_size="
                    f"{self.parallel.tensor_parallel_size}: the NKI kernels run unsharded (tensor_parallel_size=1)"
                )
        # The next step's input ids are filled in on the device from the last step's samples.
        if self.scheduler.async_scheduling and on_xla:
            raise ValueError("async_scheduling=True is not supported on the XLA device")
        if self.speculative is not None:
            # Proposals are made on the host from the tokens of the step before, so steps
            # cannot overlap.
            if self.scheduler.async_scheduling:
                raise ValueError("async_scheduling=True and speculative decoding exclude each other")
            if self.scheduler.max_num_batched_tokens < 2:
                raise ValueError(
                    f"max_num_batched_tokens={self.scheduler.max_num_batched_tokens}: speculative decoding "
                    "verifies a proposal with the token before it, two tokens a step at least"
                )
        limit = self.model.max_context_len
        if self.scheduler.max_model_len is None:
            object.__setattr__(self, "scheduler", dataclasses.replace(self.scheduler, max_model_len=limit))
        elif self.scheduler.max_model_len > limit:
            raise ValueError(
                f"max_model_len={self.scheduler.max_model_len} exceeds the model's context "
                f"({self.model.describe_context()})"
            )
        lengths = self.device.context_buckets
        if lengths and lengths[-1] > self.max_model_len:
            raise ValueError(f"context_buckets={list(lengths)!r} exceeds max_model_len={self.max_model_len}")
        if self.speculative is not None and self.speculative.num_speculative_tokens >= self.max_model_len:
            # A verification step holds the proposals and the token before them.
            raise ValueError(
                f"num_speculative_tokens={self.speculative.num_speculative_tokens} must be below "
                f"max_model_len={self.max_model_len}"
            )

    def _check_sharded_quantization(self, quant: QuantConfig) -> None:
        """Refuse, before any rank starts, a quantization that tensor-parallel shards cannot
        hold: an 8-bit LM head on the CPU or CUDA (their ranks shard the head in 16 bits only),
        or scale groups that would straddle two ranks' input columns of a row-parallel linear."""
        tp, model = self.parallel.tensor_parallel_size, self.model
        if tp == 1:
            return
        # On the XLA device one process splits the whole model by annotation, the head included.
        if quant.policy.lm_head and torch.device(self.device.device).type != "xla":
            raise ValueError(
                f"quantization={self.quantization!r} quantizes the LM head, which runs on one device: "
                f"with tensor_parallel_size={tp} the head is sharded in 16 bits only"
            )
        group_size = quant.format.group_size
        if group_size is None or len(quant.policy.skipped(model.num_hidden_layers)) == model.num_hidden_layers:
            return
        row_parallel = {"o_proj": model.num_attention_heads * model.head_dim, "down_proj": model.intermediate_size}
        for name, in_features in row_parallel.items():
            if name in quant.policy.modules and (in_features // tp) % group_size:
                raise ValueError(
                    f"quantization={self.quantization!r}: group_size={group_size} does not divide each rank's "
                    f"{in_features // tp} input features of {name} (tensor_parallel_size={tp}): a group of "
                    "scales would straddle two ranks"
                )

    @property
    def max_model_len(self) -> int:
        assert self.scheduler.max_model_len is not None
        return self.scheduler.max_model_len

    @property
    def async_scheduling(self) -> bool:
        """Whether steps overlap (``SchedulerConfig.async_scheduling``, None resolved)."""
        chosen = self.scheduler.async_scheduling
        if chosen is None:
            if self.speculative is not None:
                return False
            return torch.device(self.device.device).type == "cuda" and self.parallel.tensor_parallel_size == 1
        return chosen

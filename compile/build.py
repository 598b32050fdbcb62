"""Writing an artifact (``neuron-llm compile``); its layout and loading are ``artifact``'s."""

from __future__ import annotations

import datetime
import functools
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

from neuron_llm.buckets import BucketSet
from neuron_llm.compile.artifact import (
    FORMAT,
    FORMAT_VERSION,
    GRAPHS_DIR,
    HLO_DIR,
    MANIFEST_NAME,
    WEIGHTS_DIR,
    cache_files,
    graph_cache,
    header_sha256,
    is_artifact,
    manifest_options,
    rank_file,
    sealed,
    sha256_of,
    system_versions,
)
from neuron_llm.config import EngineConfig, SpeculativeConfig, parse_device
from neuron_llm.llm import LLM
from neuron_llm.loader import LoadedModel
from neuron_llm.loader.weights import save_safetensors
from neuron_llm.output_dir import written_whole
from neuron_llm.parallel.executor import WorkerFactory
from neuron_llm.parallel.state import torchrun_env
from neuron_llm.worker import load_worker
from neuron_llm.xla.device import compile_count


def save_rank(out_dir: Path, loaded: LoadedModel, config: EngineConfig, rank: int, world_size: int) -> None:
    """Write rank ``rank``'s share of the artifact, as its worker loaded it (before the backend
    rewrites it): its parameters; rank 0 also the model files and, on the XLA device, the HLO."""
    from neuron_llm.compile.hlo_export import export_hlo, graph_shapes
    from neuron_llm.quant.checkpoint import model_config_dict, write_model_files

    model = loaded.model
    tensors = {name: param.detach().cpu().contiguous() for name, param in model.named_parameters()}
    (out_dir / WEIGHTS_DIR).mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, out_dir / WEIGHTS_DIR / rank_file(rank, world_size))
    if rank != 0:
        return
    # The artifact's weights are our layers' own tensors: a short last group is stored as it runs.
    hf_config = model_config_dict(model, model.config, loaded.source, config.device.dtype, whole_groups=False)
    write_model_files(out_dir, hf_config, loaded.source, loaded.tokenizer)
    if parse_device(config.device.device).type == "xla":
        export_hlo(model, config, graph_shapes(config), out_dir / GRAPHS_DIR / HLO_DIR)


def compile_artifact(model: str | None, out_dir: str | Path, **options: Any) -> dict[str, Any]:
    """Build ``model``'s engine with ``options`` (``LLM``'s keyword arguments) and write its
    artifact to ``out_dir``, which must be new or empty; return the manifest.

    The artifact is written into a hidden directory beside ``out_dir`` and renamed onto it
    once whole, so a compile that fails, or is killed, leaves ``out_dir`` as it found it. On the
    XLA device ``speculative_config`` is compiled in (each prefill bucket's verification graph);
    elsewhere it is chosen at load, and refused here. Run it in a process that has not run the
    model yet (the command line does): graphs compiled earlier in the process are held in its
    memory and would not be written to the artifact's caches again, so such a process is refused.
    """
    out = Path(os.path.abspath(Path(out_dir).expanduser()))
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} is not a new or empty directory")
    if is_artifact(model):
        raise ValueError(f"{model} is a compiled artifact already: load it, or compile its source model")
    quantization = options.get("quantization")
    if quantization is not None and not isinstance(quantization, str):
        # The manifest records the option as given, in JSON; a preset's name is what it can hold.
        raise ValueError(
            f"quantization={quantization!r}: an artifact is compiled from a preset's name (int8, fp8, ...) "
            "or from a checkpoint `neuron-llm quantize` wrote"
        )
    if (env := torchrun_env()) is not None and env.world_size > 1:
        # Each rank would write its own artifact, holding its own weights alone.
        raise ValueError("compile_artifact spawns its tensor-parallel ranks itself: run it without torchrun")
    device = options.get("device") or "cpu"
    _refuse_compiled_before(parse_device(device).type)
    if options.get("warm_up") is False or options.get("enforce_eager"):
        # The warm-up is the compile: without it (or without CUDA graphs) the artifact holds none.
        option = "warm_up=False" if options.get("warm_up") is False else "enforce_eager=True"
        raise ValueError(f"{option}: compiling an artifact is warming up every bucket's graph; leave it out")
    if options.get("num_kv_blocks") is not None and parse_device(device).type != "xla":
        # Only the XLA device's graphs hold the pool; elsewhere it is sized when loaded.
        raise ValueError(
            f"num_kv_blocks is chosen when a {parse_device(device).type} artifact is loaded, not compiled into it"
        )
    speculative = SpeculativeConfig.parse(options.get("speculative_config"))
    if speculative is not None and parse_device(device).type != "xla":
        # Only the XLA device compiles graphs for it (a verification graph per prefill bucket).
        raise ValueError(
            f"speculative_config is chosen when a {parse_device(device).type} artifact is loaded, not compiled into it"
        )
    if speculative is not None and speculative != SpeculativeConfig(speculative.num_speculative_tokens):
        # The manifest could not bring the rest back at load: a draft model would become n-gram lookup.
        raise ValueError(
            f"speculative_config={options['speculative_config']!r}: an artifact compiles num_speculative_tokens alone "
            "(each prefill bucket's verification graph); choose the proposer (method, draft model, lookup lengths) "
            "when it is loaded: compile with {'num_speculative_tokens': k} and pass the rest to the loading LLM"
        )
    with written_whole(out, "compiling", last=MANIFEST_NAME) as building:
        with graph_cache(building, device):
            # LLM's own warm-up: on the devices whose graphs compile, every bucket's does now.
            llm = _CompilingLLM(building, model, **options)
        try:
            manifest = _manifest(llm.config, building)
        finally:
            llm.shutdown()
        (building / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _refuse_compiled_before(device_type: str) -> None:
    """Graphs a process compiled stay in its memory: compiling them again finds them there, and
    never writes them to the artifact's caches."""
    cuda_backend = sys.modules.get("neuron_llm.backends.cuda.backend")
    if device_type == "cuda" and cuda_backend is not None and cuda_backend.models_prepared():
        ran = "run a model on CUDA already: the Triton kernels it compiled"
    elif device_type == "xla" and writes_neuron_cache() and "torch_xla" in sys.modules and compile_count():
        ran = "compiled XLA graphs already: the NEFFs"
    else:
        return
    raise ValueError(
        f"this process has {ran} stay in its memory and would be missing from the artifact; "
        "compile in a new process (neuron-llm compile does)"
    )


def writes_neuron_cache() -> bool:
    """Whether XLA graphs compile through torch-neuronx, into its persistent cache (on torch-xla's
    CPU device nothing is cached beyond the process: the artifact holds the HLO alone)."""
    return importlib.util.find_spec("torch_neuronx") is not None


class _CompilingLLM(LLM):
    """An ``LLM`` whose workers each save their share of the artifact as they load."""

    def __init__(self, out: Path, *args: Any, **kwargs: Any) -> None:
        self._out = out
        super().__init__(*args, **kwargs)

    def _worker_factory(self, source: Path) -> WorkerFactory:
        return functools.partial(load_worker, str(source), on_loaded=functools.partial(save_rank, self._out))


def _manifest(config: EngineConfig, out: Path) -> dict[str, Any]:
    weights = {
        path.name: {**_file_record(path), "header_sha256": header_sha256(path)}
        for path in sorted((out / WEIGHTS_DIR).iterdir())
    }
    # The model files: config.json, generation_config.json, the tokenizer's.
    files = {
        str(path.relative_to(out)): _file_record(path)
        for path in sorted(out.rglob("*"))
        if path.is_file() and path.relative_to(out).parts[0] not in (WEIGHTS_DIR, GRAPHS_DIR)
    }
    return sealed(
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "options": manifest_options(config),
            "buckets": [bucket.name for bucket in BucketSet.for_engine(config).all],
            "system": system_versions(config.device.device, config.device.backend_name),
            "files": files,
            "weights": weights,
            "graphs": {name: _file_record(out / GRAPHS_DIR / name) for name in sorted(cache_files(out / GRAPHS_DIR))},
        }
    )


def _file_record(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": sha256_of(path)}

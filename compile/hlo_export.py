"""Export the HLO module of every bucket's step graph: what neuronx-cc compiles to NEFFs.

For each bucket a dummy step of exactly its shapes (num_tokens, num_seqs, max_blocks_per_seq)
is traced through the neuron backend on the XLA device as the engine serves it (forward,
KV-cache writes, logits and the sampler of its plain requests, greedy and sampled alike; with
speculative decoding, each prefill bucket's verification graph too) and the graph's
``HloModuleProto`` is written, without compiling or running it::

    DIR/<bucket>.hlo.pb     one serialized xla.HloModuleProto per bucket
    DIR/manifest.json       per bucket: its shapes, the step's inputs, the entry signature

Graph parameters are the step's inputs (the sampling parameters of each row among them),
the KV pools (the pool size is part of every graph's signature) and the weights; Python
numbers (eps, the attention scale, hash constants) are inlined as constants, not parameters
whose values a loader would have to know. Outputs are the sampled token ids (and, after
verification, the number of proposals each sequence kept) and the written pools. The
manifest names the inputs and their shapes, not each parameter's index: binding parameters
to tensors is left to the runtime that compiled the graph (``neuron_llm.compile.artifact``
keeps these modules beside torch-neuronx's cache of their NEFFs).

Under tensor parallelism (``neuron_llm.xla.spmd``) a module is the whole model's graph, its
weight and pool parameters annotated with their split (GSPMD shardings); the compiler
partitions it into the program each of the manifest's ``num_partitions`` devices runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from neuron_llm.backends.neuron import NeuronBackend
from neuron_llm.buckets import BucketSet
from neuron_llm.config import SAMPLING_FEATURES, EngineConfig, is_int
from neuron_llm.models.llama import LlamaForCausalLM
from neuron_llm.quant import quantized_linears
from neuron_llm.sample import LogprobsTensors, SamplingBatch
from neuron_llm.sample.features import PROMPT_LOGPROBS, dummy_logits_indices, feature_row, feature_sets
from neuron_llm.worker import StepInput
from neuron_llm.xla import (
    entry_parameter_shapes,
    entry_parameter_splits,
    graph_order,
    hlo_module_proto,
    import_torch_xla,
    spmd,
)
from neuron_llm.xla.runner import XlaWorker, num_verified_rows, sampled_outputs

MANIFEST_NAME = "manifest.json"
_POOL_NAMES = ("key_cache", "value_cache")


@dataclass(frozen=True)
class GraphShape:
    """The static shapes of one step graph (a bucket) and the name its files take."""

    name: str
    num_tokens: int
    """Flat batch size, padding included."""
    num_seqs: int
    """Sequences (and sampled logits rows), padding included."""
    max_blocks_per_seq: int
    """Width of the block table."""
    num_verified_rows: int = 0
    """0: the step graph of plain requests; else the graph of a step that verifies proposals
    (speculative decoding), with this many sampling rows (``XlaWorker.sampling_block``)."""
    features: tuple[str, ...] = ()
    """The sampling features (``SAMPLING_FEATURES``) the graph holds; none: the plain graph."""
    decode: bool = False
    """A decode bucket's graph: every sequence computes one token (attention may take another
    form there, as the NKI decode kernel does)."""

    def __post_init__(self) -> None:
        if not self.name or self.name in (".", "..") or any(sep in self.name for sep in "/\\"):
            raise ValueError(f"bucket name {self.name!r}: must be a plain file name (it names the bucket's file)")
        for field in ("num_tokens", "num_seqs", "max_blocks_per_seq"):
            value = getattr(self, field)
            if not is_int(value) or value < 1:
                raise ValueError(f"bucket {self.name!r}: {field}={value!r} must be an integer >= 1")
        if self.num_seqs > self.num_tokens:
            raise ValueError(f"bucket {self.name!r}: num_seqs={self.num_seqs} exceeds num_tokens={self.num_tokens}")
        if not is_int(self.num_verified_rows) or not 0 <= self.num_verified_rows <= self.num_tokens:
            raise ValueError(
                f"bucket {self.name!r}: num_verified_rows={self.num_verified_rows!r} must be 0..num_tokens"
            )
        if not set(self.features) <= set(SAMPLING_FEATURES):
            raise ValueError(f"bucket {self.name!r}: features={self.features!r} must be among {SAMPLING_FEATURES}")

    @property
    def num_sampling_rows(self) -> int:
        """Rows the graph samples (or verifies)."""
        return self.num_verified_rows or self.num_seqs


def graph_shapes(config: EngineConfig) -> list[GraphShape]:
    """The graphs an engine of ``config`` warms up on the XLA device: each bucket's plain step
    graph; with speculative decoding, each prefill bucket's verification graph (named
    ``<bucket>_verify``); each of these at every block-table width a step of it can take,
    where there are several (named ``<bucket>_c<context length>``); and each again per
    combination of the configured sampling features (named ``<graph>+<feature>+...``)."""
    buckets = BucketSet.for_engine(config)
    several = len(buckets.block_table_widths) > 1
    combos = [(), *feature_sets(config.device.sampling_features)]
    k = config.speculative.num_speculative_tokens if config.speculative is not None else None
    shapes = []
    for features in combos:
        for bucket in buckets.all:
            for width in buckets.widths_for(bucket):
                suffix = f"_c{width * config.cache.block_size}" if several else ""
                suffix += "".join(f"+{feature}" for feature in features)
                t, s = bucket.num_tokens, bucket.num_seqs
                decode = bucket.kind == "decode"
                shapes.append(GraphShape(f"{bucket.name}{suffix}", t, s, width, 0, features, decode))
                if k is not None and not decode:
                    rows = num_verified_rows(t, s, k)
                    shapes.append(GraphShape(f"{bucket.name}_verify{suffix}", t, s, width, rows, features))
    return shapes


def dummy_step(shape: GraphShape) -> StepInput:
    """A valid step of exactly ``shape``: one sequence in block 1 (one token in a decode
    bucket, two elsewhere, as every step of a prefill bucket has a sequence of two or more),
    the rest padding (with the ``prompt_logprobs`` feature, a logits row of a prompt position too).

    Only shapes and whether the step decodes reach the graph, so any such values trace the
    same module.
    """
    # A verifying sequence has two sampling rows: its own and its proposal's.
    logits_indices = dummy_logits_indices(shape.num_seqs, 2 if shape.num_verified_rows else 1, shape.features)
    n = 1 if shape.decode or shape.num_tokens == 1 else 2
    return StepInput(
        input_ids=[0] * n,
        positions=list(range(n)),
        query_lens=[n],
        seq_lens=[n],
        # Two blocks where the table has room, so any block size holds the two tokens.
        block_tables=[[1] * min(n, shape.max_blocks_per_seq)],
        logits_indices=logits_indices,
        num_padded_tokens=shape.num_tokens,
        num_padded_seqs=shape.num_seqs,
        max_blocks_per_seq=shape.max_blocks_per_seq,
    )


def step_inputs(shape: GraphShape, config: EngineConfig, num_kv_blocks: int) -> dict[str, dict[str, Any]]:
    """The graph's inputs other than weights: name -> shape, dtype (and count for the per-layer pools)."""
    # Whole pools: under tensor parallelism a graph takes every KV head, split by annotation.
    pool = [num_kv_blocks, config.cache.block_size, config.model.num_key_value_heads, config.model.head_dim]
    dtype = str(config.device.dtype).removeprefix("torch.")
    tokens, seqs, rows = [shape.num_tokens], [shape.num_seqs], [shape.num_sampling_rows]
    vocab = [shape.num_sampling_rows, config.model.vocab_size]
    num_logits_rows = shape.num_sampling_rows + (shape.num_tokens if PROMPT_LOGPROBS in shape.features else 0)
    inputs: dict[str, dict[str, Any]] = {
        "input_ids": {"shape": tokens, "dtype": "int64"},
        "positions": {"shape": tokens, "dtype": "int64"},
        "slot_mapping": {"shape": tokens, "dtype": "int64"},
        "block_tables": {"shape": [shape.num_seqs, shape.max_blocks_per_seq], "dtype": "int32"},
        "seq_lens": {"shape": seqs, "dtype": "int32"},
        "query_start_loc": {"shape": [shape.num_seqs + 1], "dtype": "int32"},
        "logits_indices": {"shape": [num_logits_rows], "dtype": "int64"},
        # Per-row sampling parameters of SamplingBatch.build_static.
        "temperature": {"shape": rows, "dtype": "float32"},
        "is_greedy": {"shape": rows, "dtype": "bool"},
        "top_k": {"shape": rows, "dtype": "int64"},
        "top_p": {"shape": rows, "dtype": "float32"},
        "min_p": {"shape": rows, "dtype": "float32"},
        "noise_keys": {"shape": [shape.num_sampling_rows, 2], "dtype": "int32"},
        "key_cache": {"shape": pool, "dtype": dtype, "count": config.model.num_hidden_layers},
        "value_cache": {"shape": pool, "dtype": dtype, "count": config.model.num_hidden_layers},
    }
    if shape.num_verified_rows:
        # Each row's proposed token (-1: none), and where its sequence's rows begin and which it is.
        for name in ("proposals", "first_row_of_seq", "seq_of_row"):
            inputs[name] = {"shape": rows, "dtype": "int64"}
    # Dense per-row tensors built on the host (``SamplingBatch``).
    if "logit_bias" in shape.features:
        inputs["logit_bias"] = {"shape": vocab, "dtype": "float32"}
    if "penalties" in shape.features:
        for name in ("repetition_penalty", "frequency_penalty", "presence_penalty"):
            inputs[name] = {"shape": [shape.num_sampling_rows, 1], "dtype": "float32"}
        inputs["output_token_counts"] = {"shape": vocab, "dtype": "float32"}
        inputs["seen_tokens"] = {"shape": vocab, "dtype": "bool"}
    if "min_tokens" in shape.features:
        inputs["min_tokens_mask"] = {"shape": vocab, "dtype": "bool"}
    return inputs


def export_hlo(
    model: LlamaForCausalLM,
    config: EngineConfig,
    shapes: Sequence[GraphShape],
    out_dir: str | Path,
    num_kv_blocks: int | None = None,
) -> dict[str, Any]:
    """Write one HLO module per bucket in ``shapes`` and the manifest to ``out_dir``; return the manifest.

    ``model`` is moved to the XLA device (under tensor parallelism, sharded over the
    process's devices) and traced with the neuron backend (the active backend is restored
    afterwards). ``num_kv_blocks`` (default ``config.cache.num_kv_blocks``)
    fixes the KV pool shape the graphs take. ``out_dir`` must be new or empty; the manifest
    is written last, and an export that fails removes what it wrote, so a directory with a
    manifest always holds one whole export. Raises ``ValueError`` for a pool that is not set
    or too small, bucket names that repeat, an ``out_dir`` that holds files, or a model that
    is not the one ``config`` describes (weights in another dtype), and, under tensor
    parallelism, unless the process sees as many XLA devices as the degree.
    """
    if num_kv_blocks is None:
        num_kv_blocks = config.cache.num_kv_blocks
    if num_kv_blocks is None:
        raise ValueError("num_kv_blocks=None: set the KV pool size; every graph's signature holds it")
    if not is_int(num_kv_blocks) or num_kv_blocks < 2:
        raise ValueError(f"num_kv_blocks={num_kv_blocks!r}: the KV pool needs an integer number of blocks >= 2")
    names = [shape.name for shape in shapes]
    if len(set(names)) != len(names):
        raise ValueError(f"bucket names must be unique: {names}")
    _check_model(model, config)
    if config.parallel.tensor_parallel_size > 1:
        spmd.make_mesh(config.parallel.tensor_parallel_size)  # checks the devices before anything is written
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"out_dir {out} is not a new or empty directory")
    torch_xla = import_torch_xla()
    out.mkdir(parents=True, exist_ok=True)
    manifest_path, partial_manifest = out / MANIFEST_NAME, out / f"{MANIFEST_NAME}.tmp"
    written = [out / f"{shape.name}.hlo.pb" for shape in shapes] + [partial_manifest, manifest_path]
    try:
        graphs = [_export_graph(model, config, shape, num_kv_blocks, out) for shape in shapes]
        manifest = {
            "format": "xla.HloModuleProto",
            "backend": NeuronBackend.name,
            "torch_version": torch.__version__,
            "torch_xla_version": torch_xla.__version__,
            "block_size": config.cache.block_size,
            "num_kv_blocks": num_kv_blocks,
            "num_partitions": config.parallel.tensor_parallel_size,
            "dtype": str(config.device.dtype).removeprefix("torch."),
            "quantization": sorted({fmt.scheme for fmt in quantized_linears(model).values()}),
            "graphs": graphs,
        }
        # Whole or not at all: a reader never sees half a manifest.
        partial_manifest.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(partial_manifest, manifest_path)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return manifest


def _check_model(model: LlamaForCausalLM, config: EngineConfig) -> None:
    """Refuse a model that is not the one ``config`` describes: its graphs would not be served."""
    dtype = config.device.dtype
    # Quantized linears keep their own dtypes (int8 or fp8 weights, float32 scales).
    quantized = tuple(f"{name}." for name in quantized_linears(model))
    other = sorted(
        {
            str(p.dtype)
            for name, p in model.named_parameters()
            if p.is_floating_point() and not name.startswith(quantized)
        }
        - {str(dtype)}
    )
    if other:
        raise ValueError(f"the model holds {', '.join(other)} weights, not the config's dtype {dtype}: cast it first")


def trace_graph(
    model: LlamaForCausalLM, config: EngineConfig, shape: GraphShape, num_kv_blocks: int
) -> tuple[bytes, list[str], dict[str, dict[str, Any]]]:
    """The serialized HLO module of ``shape``'s step graph, traced as ``export_hlo`` does, the
    names of its outputs in order, and the shape and dtype of each output but the pools.

    The backend rewrites ``model`` in place first, as the serving worker's does (so it need
    not again): with the NKI int8 matmul, its layers are the kernel's."""
    # A fresh worker per bucket: its pools start as plain device data, so the traced graph
    # takes them as parameters and holds no earlier bucket's pending writes. The worker and
    # its pending tensors are dropped on return, before the next worker's sync could run them.
    xla_config = dataclasses.replace(config, device=dataclasses.replace(config.device, device="xla"))
    backend = NeuronBackend(config.device.nki_kernels)
    backend.prepare_model(model)
    worker = XlaWorker(model, xla_config, num_kv_blocks, backend)
    # Traced as the worker serves it (Python numbers inlined as constants): the same module.
    step = dummy_step(shape)
    row = feature_row(set(shape.features) - {PROMPT_LOGPROBS})
    if shape.num_verified_rows:
        if worker.sampling_block(step, verifying=True) != shape.num_verified_rows:
            raise ValueError(f"bucket {shape.name!r}: num_verified_rows={shape.num_verified_rows} is not the engine's")
        sampled, prompt_logits = worker.trace_verified(step, [row], [[0]])
    else:
        batch = SamplingBatch.build_static([row], config.model.vocab_size, worker.device, shape.num_seqs)
        sampled, prompt_logits = worker.trace_sampled(step, batch)
    outputs = dict(zip(_sampled_names(shape), sampled_outputs(sampled), strict=True))
    if prompt_logits is not None:
        outputs["prompt_logits"] = prompt_logits
    for layer, pools in enumerate(worker.kv_caches):
        outputs.update({f"{name}[{layer}]": pool for name, pool in zip(_POOL_NAMES, pools, strict=True)})
    ordered = graph_order(list(outputs.values()))
    name_of: dict[int, str] = {}
    specs: dict[str, dict[str, Any]] = {}
    for name, tensor in outputs.items():
        first = name_of.setdefault(id(tensor), name)
        if name.endswith("]"):
            continue  # a pool: shaped as the inputs say
        # One output can be two (the sampled ids are the ids greedy logprobs score).
        specs[name] = (
            {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}
            if first == name
            else {"same_as": first}
        )
    return hlo_module_proto(ordered), [name_of[id(tensor)] for tensor in ordered], specs


def _sampled_names(shape: GraphShape) -> list[str]:
    # In ``sampled_outputs``' order: with logprobs, those of ``LogprobsTensors``; after
    # verification, how many of each sequence's proposals were kept (padding rows: 0).
    logprobs = (
        [f"logprobs.{f.name}" for f in dataclasses.fields(LogprobsTensors)] if "logprobs" in shape.features else []
    )
    return ["token_ids", *logprobs, *(["num_accepted"] if shape.num_verified_rows else [])]


def _export_graph(
    model: LlamaForCausalLM, config: EngineConfig, shape: GraphShape, num_kv_blocks: int, out: Path
) -> dict[str, Any]:
    proto, order, specs = trace_graph(model, config, shape, num_kv_blocks)
    path = out / f"{shape.name}.hlo.pb"
    path.write_bytes(proto)
    parameters = entry_parameter_shapes(proto)
    return {
        "bucket": shape.name,
        "file": path.name,
        "sha256": hashlib.sha256(proto).hexdigest(),
        "num_tokens": shape.num_tokens,
        "num_seqs": shape.num_seqs,
        "num_verified_rows": shape.num_verified_rows,
        "max_blocks_per_seq": shape.max_blocks_per_seq,
        "features": list(shape.features),
        "inputs": step_inputs(shape, config, num_kv_blocks),
        # The output tuple, in the order a step's sync gives it. The written pools' aliasing to
        # the pool parameters is not in the module: torch-xla adds it when it compiles a step itself.
        "outputs": {"order": order, **specs},
        "entry_parameters": {
            "count": len(parameters),
            "shapes": [str(p) for p in parameters],
            # Under tensor parallelism, each parameter's tiles along its dimensions (null: whole).
            **({"splits": entry_parameter_splits(proto)} if config.parallel.tensor_parallel_size > 1 else {}),
        },
    }

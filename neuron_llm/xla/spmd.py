"""Tensor parallelism on the XLA device: one process, one graph, weights sharded by annotation.

On the XLA device a tensor-parallel model is not split into per-rank modules that call
collectives (``neuron_llm.parallel``, which runs one process a GPU or CPU rank). The whole
model is traced once, as at one device, and its weights and KV pools carry sharding
annotations over a one-axis mesh of the process's devices (torch-xla's SPMD, GSPMD:
https://arxiv.org/abs/2105.04663). XLA's partitioner splits each graph into the program
every device runs and inserts the collectives, so a step stays one graph and the engine
one process, as NxD Inference traces one program for all of its ranks. The annotations are
Megatron's split (Shoeybi et al., 2019)::

    q_proj, k_proj, v_proj, gate_proj, up_proj   output features (heads, intermediate)
    o_proj, down_proj                            input features: the partitioner all-reduces
    embed_tokens, lm_head                        vocabulary rows
    KV pools                                     KV heads
    logits                                       replicated, for the sampler

Norm weights and everything else are replicated. Whatever the annotations, a partitioned
graph computes what the unsharded one does; they only decide where data lives and which
collectives run.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from neuron_llm.xla.device import import_torch_xla

AXIS = "tp"
SPLIT_OUTPUTS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head", "embed_tokens")
"""Modules whose tensors are split along their first dimension (output features, vocabulary rows)."""
SPLIT_INPUTS = ("o_proj", "down_proj")
"""Modules whose matrices are split along their last dimension (input features, or input groups of scales)."""


def check_shape(tensor_parallel_size: int, num_kv_heads: int) -> None:
    """Refuse a split the KV pools cannot take: each device holds whole KV heads of its own."""
    if num_kv_heads % tensor_parallel_size:
        raise ValueError(
            f"tensor_parallel_size={tensor_parallel_size} must divide num_key_value_heads={num_kv_heads} "
            "on the XLA device, whose KV pools are split by KV head"
        )


@functools.cache
def make_mesh(tensor_parallel_size: int) -> object:
    """Turn on SPMD for this process and return the mesh of its ``tensor_parallel_size`` devices.

    Raises ``ValueError`` if the process used the XLA device before SPMD was on, or unless it
    sees exactly that many devices (a NeuronCore each under torch-neuronx; on the CPU,
    ``CPU_NUM_DEVICES``). Once on, SPMD stays on: an unsharded model built later (a draft
    model) is replicated on every device. The mesh is made once: loading checks the devices
    before the weights are read, and the worker takes the same mesh.
    """
    torch_xla = import_torch_xla()
    import numpy as np
    import torch_xla.distributed.spmd as xs
    import torch_xla.runtime as xr

    # Counting the devices neither takes one nor fixes the mode: a refusal leaves SPMD off.
    num_devices = xr.global_runtime_device_count()
    if num_devices != tensor_parallel_size:
        raise ValueError(
            f"tensor_parallel_size={tensor_parallel_size} on the XLA device shards over every device "
            f"this process sees, and it sees {num_devices}: set NEURON_RT_NUM_CORES={tensor_parallel_size} "
            f"on Neuron (CPU_NUM_DEVICES={tensor_parallel_size} with PJRT_DEVICE=CPU)"
        )
    warn_if_unsupported(xr.device_type())
    if not xr.is_spmd():
        if torch_xla._XLAC._xla_get_spmd_config_is_locked():
            # The device was taken without SPMD (a tensor, torch_xla.device()): turning it on now
            # crashes torch-xla's later steps.
            raise ValueError(
                f"tensor_parallel_size={tensor_parallel_size}: this process has used the XLA device without "
                "tensor parallelism already (another LLM, a compile); build the tensor-parallel LLM in a fresh "
                "process"
            )
        xr.use_spmd()
    return xs.Mesh(np.arange(num_devices), (num_devices,), (AXIS,))


def warn_if_unsupported(device_type: str) -> None:
    """Warn on NeuronCores (PJRT device type ``NEURON``): torch-neuronx lists GSPMD among its known
    limitations ("PyTorch NeuronX currently does not support GSPMD", 2.9 release notes), and this
    path is verified on torch-xla's CPU devices only."""
    if device_type == "NEURON":
        warnings.warn(
            "tensor parallelism on the XLA device partitions its graphs with GSPMD, which torch-neuronx lists as "
            "not supported; it is verified on torch-xla's CPU devices only and may not compile or run on NeuronCores",
            stacklevel=3,
        )


def shard_model(model: nn.Module, mesh: object) -> int:
    """Annotate the weights of ``model`` (on the XLA device) with the split of the module
    docstring; return the bytes of its parameters one device holds (a tied one once)."""
    size = _mesh_size(mesh)
    split: set[int] = set()
    for name, module in model.named_modules():
        kind = name.rsplit(".", 1)[-1]
        tensors = [t for t in [*module._parameters.values(), *module._buffers.values()] if t is not None]
        for tensor in tensors:
            if kind in SPLIT_OUTPUTS and tensor.shape[0] % size == 0:
                _mark(tensor, mesh, 0)
            elif kind in SPLIT_INPUTS and tensor.dim() == 2 and tensor.shape[1] % size == 0:
                _mark(tensor, mesh, 1)
            else:
                continue
            split.add(id(tensor))
    return sum(p.numel() * p.element_size() // (size if id(p) in split else 1) for p in model.parameters())


def shard_kv_caches(kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]], mesh: object) -> None:
    """Annotate each pool [num_blocks, block_size, num_kv_heads, head_dim] as split by KV head."""
    for pools in kv_caches:
        for pool in pools:
            _mark(pool, mesh, 2)


def gather_logits(logits: torch.Tensor, mesh: object) -> torch.Tensor:
    """The LM head's logits [rows, vocab], whole on every device for the sampler.

    Left to itself the partitioner may gather the head's weight (vocabulary x hidden) and
    compute every logit on every device; pinning the head's output as split by vocabulary
    first makes it gather the logits instead, a few rows rather than the whole matrix.
    """
    import torch_xla.distributed.spmd as xs

    _mark(logits, mesh, 1)
    whole = logits.clone()
    xs.mark_sharding(whole, mesh, (None, None))
    return whole


def _mark(tensor: torch.Tensor, mesh: object, dim: int) -> None:
    import torch_xla.distributed.spmd as xs

    spec = [None] * tensor.dim()
    spec[dim] = AXIS
    xs.mark_sharding(tensor, mesh, tuple(spec))


def _mesh_size(mesh: object) -> int:
    return int(mesh.size())  # type: ignore[attr-defined]

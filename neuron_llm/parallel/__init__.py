"""Tensor parallelism (Megatron-style) on ``torch.distributed``: NCCL on GPU, gloo on CPU.

``shard_model`` swaps a single-device ``LlamaForCausalLM``'s layers for parallel ones before
its weights load; ``make_executor`` runs engine steps on one device or on a group of
processes, one per device, started by the library or by torchrun.
"""

from neuron_llm.parallel.executor import (
    Executor,
    MultiprocExecutor,
    UniprocExecutor,
    WorkerFactory,
    make_executor,
)
from neuron_llm.parallel.launch import WorkerError
from neuron_llm.parallel.layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    Partition,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from neuron_llm.parallel.plan import kv_head_partition, shard_model
from neuron_llm.parallel.state import (
    ParallelState,
    destroy_distributed,
    init_distributed,
    init_from_torchrun,
    parallel_state,
)

__all__ = [
    "ColumnParallelLinear",
    "Executor",
    "MultiprocExecutor",
    "ParallelLMHead",
    "ParallelState",
    "Partition",
    "RowParallelLinear",
    "UniprocExecutor",
    "VocabParallelEmbedding",
    "WorkerError",
    "WorkerFactory",
    "destroy_distributed",
    "init_distributed",
    "init_from_torchrun",
    "kv_head_partition",
    "make_executor",
    "parallel_state",
    "shard_model",
]

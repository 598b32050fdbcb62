"""The tensor-parallel process group of this process, and the collectives the layers use.

One process per device. Two groups span the same ranks:

- the model group (NCCL on GPU, gloo on CPU) carries the all-reduces and all-gathers of
  the forward; its timeout bounds how long a rank waits for a peer inside a step.
- the control group (always gloo, on the host) carries what rank 0 sends the others: each
  step's ``StepInput`` and the startup agreement on the KV pool size. The other ranks wait
  on it without a limit, because an idle server legitimately sends nothing for hours; rank
  0 waits at most the model group's timeout for them to take a step. A peer that dies is
  noticed at once, since its connections close.

Before ``init_distributed`` (or after ``destroy_distributed``) the world size is 1 and
every collective is a no-op, so an unsharded model never touches ``torch.distributed``.
"""

from __future__ import annotations

import os
import pickle
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from neuron_llm.config import ParallelConfig

DEFAULT_TIMEOUT_S = ParallelConfig.distributed_timeout
"""Seconds a rank waits for its peers in one collective (or to join the group) before failing."""

_CONTROL_TIMEOUT = timedelta(days=365)
_TIMEOUT_SLACK_S = 0.5
"""gloo may end a timed wait a little before its deadline (it counts in whole milliseconds)."""


@dataclass(frozen=True)
class ParallelState:
    """This process's place in the tensor-parallel group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    """Index of this process's device on its host (torchrun's LOCAL_RANK)."""
    group: dist.ProcessGroup | None = None
    """The model's collectives; None when the world size is 1."""
    control_group: dist.ProcessGroup | None = None
    """Host-side messages from rank 0; None when the world size is 1."""
    timeout_s: float = DEFAULT_TIMEOUT_S
    """How long a rank waits for its peers in a collective, and rank 0 for them to take a message."""


@dataclass(frozen=True)
class TorchrunEnv:
    """The rank variables torchrun (or another launcher) sets in every process it starts."""

    rank: int
    world_size: int
    local_rank: int


_state = ParallelState()


def parallel_state() -> ParallelState:
    """The state set by the last ``init_distributed``; rank 0 of 1 when none is active."""
    return _state


def torchrun_env() -> TorchrunEnv | None:
    """Read RANK, WORLD_SIZE and LOCAL_RANK; None when this process was not started by a launcher,
    or by one of a single process (a Kubeflow pod sets them so), which has no ranks to join.

    Raises ``ValueError`` when RANK and WORLD_SIZE are set but MASTER_ADDR or MASTER_PORT is
    missing, since the ranks could not find each other.
    """
    if "RANK" not in os.environ or os.environ.get("WORLD_SIZE", "1") == "1":
        return None
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise ValueError(f"RANK and WORLD_SIZE are set but {', '.join(missing)} is not; start the ranks with torchrun")
    rank = int(os.environ["RANK"])
    return TorchrunEnv(rank, int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", rank)))


def init_distributed(
    world_size: int,
    rank: int,
    backend: str,
    init_method: str | None = None,
    *,
    store: dist.Store | None = None,
    local_rank: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> ParallelState:
    """Join the tensor-parallel group as ``rank`` of ``world_size`` and make it this process's state.

    Ranks meet through ``init_method`` (``"tcp://host:port"``, ``"env://"``) or an existing
    ``store``. ``backend`` is ``"gloo"`` (CPU) or ``"nccl"`` (CUDA: this process then uses
    GPU ``local_rank``, which defaults to ``rank``). Every rank must call this; it returns
    once all have joined, or raises after ``timeout_s``.
    """
    global _state
    if _state.world_size > 1:
        raise RuntimeError(
            "a tensor-parallel group is running in this process already (one tensor-parallel LLM at a time): "
            "shut the other down first (LLM.shutdown())"
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    local_rank = rank if local_rank is None else local_rank
    if world_size == 1:
        _state = ParallelState(local_rank=local_rank)
        return _state
    if backend == "nccl":
        # NCCL binds each communicator to the current device, so pick this rank's GPU first.
        torch.cuda.set_device(local_rank)
    dist.init_process_group(
        backend,
        init_method=init_method,
        store=store,
        world_size=world_size,
        rank=rank,
        timeout=timedelta(seconds=timeout_s),
    )
    control_group = dist.new_group(backend="gloo", timeout=_CONTROL_TIMEOUT)
    _state = ParallelState(rank, world_size, local_rank, dist.group.WORLD, control_group, timeout_s)
    return _state


def init_from_torchrun(backend: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> ParallelState:
    """``init_distributed`` from the launcher's environment (see ``torchrun_env``)."""
    env = torchrun_env()
    if env is None:
        raise RuntimeError("RANK and WORLD_SIZE are not set: this process was not started by torchrun")
    return init_distributed(env.world_size, env.rank, backend, "env://", local_rank=env.local_rank, timeout_s=timeout_s)


def destroy_distributed() -> None:
    """Leave the tensor-parallel group (if any); the world size is 1 again."""
    global _state
    if dist.is_initialized():
        dist.destroy_process_group()
    _state = ParallelState()


def _model_group(world_size: int) -> dist.ProcessGroup | None:
    # A sharded layer knows how many ranks it was split for; running it in a group of another
    # size (typically: no group at all) would silently return a partial result.
    if world_size != _state.world_size:
        raise RuntimeError(
            f"a layer sharded for {world_size} ranks runs in a tensor-parallel group of {_state.world_size}; "
            "call init_distributed() on every rank before the forward"
        )
    return _state.group


def all_reduce(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """Sum ``x`` over the ``world_size`` ranks of the model group, in place; ``x`` when it is 1."""
    if world_size == 1:
        return x
    dist.all_reduce(x, group=_model_group(world_size))
    return x


def all_gather_last_dim(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """Concatenate every rank's ``x`` along the last dimension, in rank order; ``x`` when alone."""
    if world_size == 1:
        return x
    group = _model_group(world_size)
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=-1)


def broadcast_from_driver(obj: object) -> object:
    """Rank 0's ``obj``, on every rank (others pass anything); ``obj`` itself when alone.

    Goes over the control group, so the other ranks may wait here indefinitely for the next
    message. Rank 0's broadcast returns only once every rank has taken it, and waits at most
    ``timeout_s`` for that: a rank stalled between steps fails the step instead of holding
    rank 0 forever. Raises ``TimeoutError`` then.
    """
    if _state.world_size == 1:
        return obj
    group = _state.control_group
    if _state.rank > 0:
        size = torch.empty(1, dtype=torch.int64)
        dist.broadcast(size, src=0, group=group)
        data = torch.empty(int(size), dtype=torch.uint8)
        dist.broadcast(data, src=0, group=group)
        return pickle.loads(data.numpy().tobytes())
    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
    deadline = time.monotonic() + _state.timeout_s
    for tensor in (torch.tensor([data.numel()]), data):
        work = dist.broadcast(tensor, src=0, group=group, async_op=True)
        try:
            work.wait(timedelta(seconds=max(0.0, deadline - time.monotonic())))
        except RuntimeError as e:
            if time.monotonic() < deadline - _TIMEOUT_SLACK_S:
                raise  # a peer's connection closed, not a timeout
            raise TimeoutError(
                f"tensor-parallel ranks did not take rank 0's next step within {_state.timeout_s:g} s"
            ) from e
    return obj


def broadcast_tensor_from_driver(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``tensor`` on every rank, over the model group: the others pass a buffer of its
    shape, dtype and device, filled in place. Queued like a kernel on a GPU (no host wait)."""
    if _state.world_size > 1:
        dist.broadcast(tensor, src=0, group=_state.group)
    return tensor


def min_over_ranks(value: int) -> int:
    """The smallest ``value`` any rank passes (over the control group)."""
    if _state.world_size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=_state.control_group)
    return int(tensor.item())

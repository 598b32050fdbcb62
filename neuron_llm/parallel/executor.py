"""Executors: how the engine (on rank 0) runs a step on one device or on a tensor-parallel group.

The engine sees one interface, ``Executor``: ``execute_and_sample(step, rows)`` runs a
step and samples it on rank 0's device (``execute(step)`` returns the fp32 logits instead),
``num_kv_blocks`` is the KV pool size every rank holds, ``shutdown()`` ends the ranks.

With tensor parallelism every rank holds a ``Worker`` over its model shard. Each step,
rank 0 sends the ``StepInput`` (a few plain lists) to the others over the control group and
all ranks run the same forward; the LM head's all-gather gives rank 0 the full logits,
and rank 0 alone samples. Sending ``None`` ends the others' loop.

Workers are built by a ``WorkerFactory`` that runs in each rank's own process, so every
rank loads only its shard, on its own device. It must be picklable to reach spawned ranks:
a module-level function, or ``functools.partial`` of one over plain data.

A rank that fails does not leave rank 0 waiting. A spawned rank reports its traceback and
exits; rank 0 checks that every rank is alive before each step, and on the CPU (gloo) the
closed connections fail rank 0's collective at once, so ``execute`` raises ``WorkerError``
with that traceback. A rank that hangs fails rank 0's gloo collective after ``timeout_s``;
so does a spawned one that never finishes loading (counted from rank 0's own load).
On CUDA a peer lost in the middle of a step is noticed by NCCL's watchdog after
``timeout_s``, which by torch's default (TORCH_NCCL_ASYNC_ERROR_HANDLING) aborts rank 0's
process rather than raising. After any failure the executor is shut down. Ctrl-C in a step is
held back until the step ends, and then raised with the group still in step (a second one
stops it at once).
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.util import Finalize
from types import TracebackType
from typing import NoReturn, TypeVar

import torch
import torch.distributed as dist
from typing_extensions import Self

from neuron_llm.config import EngineConfig
from neuron_llm.interrupts import interrupt_after
from neuron_llm.parallel.launch import (
    POLL_S,
    STOP_GRACE_S,
    RankProcesses,
    WorkerError,
    config_for_rank,
    distributed_backend,
    gloo_on_loopback,
    leave_stop_signals_to_rank_0,
    share_host_threads,
)
from neuron_llm.parallel.state import (
    ParallelState,
    TorchrunEnv,
    broadcast_from_driver,
    broadcast_tensor_from_driver,
    destroy_distributed,
    init_distributed,
    init_from_torchrun,
    min_over_ranks,
    parallel_state,
    torchrun_env,
)
from neuron_llm.sample import RowState
from neuron_llm.worker import StepInput, StepOutput, Worker, allocate_kv_cache

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

WorkerFactory = Callable[[EngineConfig, int, int], Worker]
"""``build_worker(config, rank, world_size)``: rank ``rank``'s Worker over its model shard.

``config`` carries that rank's device. The factory typically calls
``load_model(path, dtype=..., device=..., shard=lambda m: shard_model(m, rank, world_size))``.
"""


class Executor(abc.ABC):
    """Runs engine steps; the engine holds one and never asks how many devices it spans."""

    num_kv_blocks: int
    """KV blocks per layer, the same on every rank; block 0 is the reserved null block."""
    worker: Worker
    """This process's (rank 0's) worker."""

    @abc.abstractmethod
    def execute(self, step: StepInput) -> torch.Tensor:
        """Run one step; return fp32 logits [len(step.logits_indices), vocab_size]."""

    @abc.abstractmethod
    def execute_and_sample(
        self,
        step: StepInput,
        rows: Sequence[RowState],
        eos_token_ids: Sequence[int] = (),
        sampled_before: torch.Tensor | None = None,
        draft_token_ids: Sequence[Sequence[int]] | None = None,
    ) -> StepOutput:
        """Run one step and sample ``rows`` on rank 0's device (see ``Worker.execute_and_sample``)."""

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Release the devices (and end the other ranks); later calls do nothing."""

    @property
    def is_alive(self) -> bool:
        """Whether steps can run: false once a tensor-parallel group has failed or shut down."""
        return True

    def take_failure(self) -> Exception | None:
        """Why a group that was running can run no step: a rank's failure found now (the group
        is then stopped, and later calls return None); None otherwise."""
        return None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.shutdown()


class UniprocExecutor(Executor):
    """One device, one ``Worker``, in this process."""

    def __init__(self, config: EngineConfig, build_worker: WorkerFactory) -> None:
        self.worker = build_worker(config, 0, 1)
        self.num_kv_blocks = self.worker.num_kv_blocks
        self._is_running = True

    def execute(self, step: StepInput) -> torch.Tensor:
        self._check_running()
        return self.worker.execute(step)

    def execute_and_sample(
        self,
        step: StepInput,
        rows: Sequence[RowState],
        eos_token_ids: Sequence[int] = (),
        sampled_before: torch.Tensor | None = None,
        draft_token_ids: Sequence[Sequence[int]] | None = None,
    ) -> StepOutput:
        self._check_running()
        return self.worker.execute_and_sample(step, rows, eos_token_ids, sampled_before, draft_token_ids)

    def shutdown(self) -> None:
        if self._is_running:
            self._is_running = False
            self.worker.close(wait=True)

    @property
    def is_alive(self) -> bool:
        return self._is_running

    def _check_running(self) -> None:
        if not self._is_running:
            raise RuntimeError("the executor is shut down (after shutdown())")


class MultiprocExecutor(Executor):
    """Rank 0 of a tensor-parallel group of ``config.parallel.tensor_parallel_size`` processes.

    Under torchrun (RANK and WORLD_SIZE set) this process must be rank 0 and joins the
    group torchrun started; otherwise it spawns ranks 1..N-1 itself. It then builds its own
    worker with ``build_worker`` while the other ranks build theirs, and all agree on the
    smallest KV pool any rank proposed. ``timeout_s`` (None: the config's
    ``distributed_timeout``) bounds the wait for ranks to start, for a spawned rank to finish
    loading once rank 0 has, and for a peer in any collective.

    Raises ``WorkerError`` when another rank fails, during construction or any step.
    """

    def __init__(self, config: EngineConfig, build_worker: WorkerFactory, *, timeout_s: float | None = None) -> None:
        world_size = config.parallel.tensor_parallel_size
        timeout_s = config.parallel.distributed_timeout if timeout_s is None else timeout_s
        backend = distributed_backend(config.device.device)
        self._ranks: RankProcesses | None = None
        self._timeout_s = timeout_s
        self._abandoned: threading.Thread | None = None
        self._host_threads: int | None = None
        """This process's threads before it took its share of the CPU, given back at the end."""
        env = torchrun_env()
        if env is None:
            self._ranks = RankProcesses(world_size, _serve_spawned_rank, (config, build_worker, timeout_s), timeout_s)
            try:
                self._ranks.wait_until_ready()
                join = functools.partial(
                    init_distributed, world_size, 0, backend, store=self._ranks.store, timeout_s=timeout_s
                )
                with gloo_on_loopback():
                    state = self._await_ranks(join, "join the group")
            except BaseException:
                self._ranks.stop(graceful=False)
                raise
            # The spawned ranks take their share of the cores; so does rank 0 (torchrun's
            # ranks have one thread each unless OMP_NUM_THREADS says otherwise).
            if backend == "gloo":
                self._host_threads = share_host_threads(world_size)
        else:
            if env.rank != 0:
                raise RuntimeError(f"MultiprocExecutor runs on rank 0; this is rank {env.rank} (use make_executor)")
            _check_world_size(env.world_size, world_size)
            state = init_from_torchrun(backend, timeout_s=timeout_s)
        self._is_running = True
        # Dropped without shutdown() (a notebook cell run again), the spawned ranks end with it,
        # and the process-wide group goes, so that another tensor-parallel LLM can start.
        self._finalizer = (
            Finalize(self, _release_ranks, args=(self._ranks, self._host_threads), exitpriority=10)
            if self._ranks is not None
            else None
        )
        try:
            self.worker = build_worker(config_for_rank(config, state.local_rank), 0, world_size)
            agree = functools.partial(agree_on_num_kv_blocks, self.worker)
            # torchrun watches its ranks itself, and this thread could not be joined.
            self.num_kv_blocks = agree() if self._ranks is None else self._await_ranks(agree, "finish loading")
        except BaseException as e:  # noqa: BLE001 - see _fail
            self._fail(e)

    @property
    def is_alive(self) -> bool:
        # A rank may die between steps (the OOM killer): health checks must not wait for a step to see it.
        return self._is_running and (self._ranks is None or self._ranks.all_running())

    def take_failure(self) -> Exception | None:
        if not self._is_running or self._ranks is None or (failure := self._ranks.failure(wait_s=0)) is None:
            return None
        self._stop(graceful=False)
        return failure

    def execute(self, step: StepInput) -> torch.Tensor:
        return self._run(step, lambda: self.worker.execute(step))

    def execute_and_sample(
        self,
        step: StepInput,
        rows: Sequence[RowState],
        eos_token_ids: Sequence[int] = (),
        sampled_before: torch.Tensor | None = None,
        draft_token_ids: Sequence[Sequence[int]] | None = None,
    ) -> StepOutput:
        # The other ranks run the plain forward: sampling follows the logits' all-gather.
        if sampled_before is not None:
            step = dataclasses.replace(step, num_sampled_before=sampled_before.numel())
        run = functools.partial(
            self.worker.execute_and_sample, step, rows, eos_token_ids, sampled_before, draft_token_ids
        )
        return self._run(step, run, sampled_before)

    def _run(self, step: StepInput, run_on_rank_0: Callable[[], _T], sampled_before: torch.Tensor | None = None) -> _T:
        """Send ``step`` (and ``sampled_before``, the ids its placeholders index) to the other
        ranks, then run it here with ``run_on_rank_0``."""
        if not self._is_running:
            raise RuntimeError("the tensor-parallel executor is shut down (after shutdown() or a failure)")
        if (failure := self.take_failure()) is not None:
            raise failure
        try:
            # A Ctrl-C raised inside a collective would leave the ranks out of step for good.
            with interrupt_after() as interrupted:
                broadcast_from_driver(step)
                if sampled_before is not None:
                    broadcast_tensor_from_driver(sampled_before)
                result = run_on_rank_0()
        except BaseException as e:  # noqa: BLE001 - see _fail
            self._fail(e)
        if interrupted:  # every rank has left the step's collectives: the group runs on
            raise KeyboardInterrupt
        return result

    def _await_ranks(self, wait: Callable[[], _T], what: str) -> _T:
        """``wait()``, a call that returns once the other ranks take part, run on a thread while
        this one watches: ``WorkerError`` as soon as a spawned rank fails, or once ``timeout_s``
        has passed. (The collectives themselves could wait forever: a rank that dies before
        joining the group leaves no connection to close, and the control group never times out.)
        """
        result: list[_T] = []
        errors: list[BaseException] = []

        def run() -> None:
            try:
                result.append(wait())
            except BaseException as e:  # noqa: BLE001 - handed to the watching thread
                errors.append(e)

        thread = threading.Thread(target=run, name=f"neuron-llm-{what.replace(' ', '-')}", daemon=True)
        thread.start()
        deadline = time.monotonic() + self._timeout_s
        try:
            while thread.is_alive():
                thread.join(POLL_S)
                failure = self._ranks.failure(wait_s=0) if self._ranks is not None else None
                if failure is None and thread.is_alive() and time.monotonic() > deadline:
                    failure = WorkerError(f"tensor-parallel ranks did not {what} within {self._timeout_s:g} s")
                if failure is not None and thread.is_alive():
                    raise failure
        except BaseException:
            if thread.is_alive():
                # Left inside its collective until the ranks are stopped (``_stop`` joins it).
                self._abandoned = thread
            raise
        if errors:
            raise errors[0]
        return result[0]

    def shutdown(self) -> None:
        """Tell the ranks to exit and wait for them; a rank found dead is logged, not raised:
        shutting down is what a caller does after an error, which this must not replace."""
        if not self._is_running:
            return
        failure = self._ranks.failure(wait_s=0) if self._ranks is not None else None
        interrupt = None
        if failure is None:
            try:
                broadcast_from_driver(None)
            except Exception as e:  # noqa: BLE001 - logged below
                failure = e
            except BaseException as e:  # noqa: BLE001 - Ctrl-C while a stalled rank holds the broadcast
                interrupt = e
        if failure is not None:
            logger.warning("tensor-parallel shutdown after a rank failed: %s", failure)
        self._stop(graceful=failure is None and interrupt is None)
        if interrupt is not None:
            raise interrupt

    def _fail(self, cause: BaseException) -> NoReturn:
        """Shut everything down and raise what another rank reported, else ``cause`` itself.

        Whatever the error, the ranks' collectives are now out of step (some rank is inside
        one the others will never enter), so the group cannot be used again. An interrupt
        (Ctrl-C) stops the ranks at once and is raised as it is; so is a ``ValueError``,
        refused input (a damaged checkpoint, a quantization the model cannot take), which the
        other ranks met too and whose message says all: their tracebacks would bury it.
        """
        wants_report = isinstance(cause, Exception) and not isinstance(cause, (WorkerError, ValueError))
        failure = self._ranks.failure() if self._ranks is not None and wants_report else None
        self._stop(graceful=False)
        try:
            if failure is None:
                raise cause
            raise failure from cause
        finally:
            # The raised error's traceback holds this frame: without the names, error and frame
            # form a cycle, and the collective's frames in it keep the process group (and rank
            # 0's store port) alive until the cyclic collector runs, not until the error is dropped.
            del failure, cause

    def _stop(self, graceful: bool) -> None:
        self._is_running = False
        if getattr(self, "_finalizer", None) is not None:
            self._finalizer.cancel()
        if self._ranks is not None:
            self._ranks.stop(graceful)
        if self._abandoned is not None:
            # With its peers gone, its collective fails; the group must not go away under it.
            self._abandoned.join(STOP_GRACE_S)
        if (worker := getattr(self, "worker", None)) is not None:
            worker.close(wait=graceful)
        destroy_distributed()
        if self._host_threads is not None:
            torch.set_num_threads(self._host_threads)
            self._host_threads = None


def _release_ranks(ranks: RankProcesses, host_threads: int | None) -> None:
    ranks.stop(graceful=False)
    destroy_distributed()
    if host_threads is not None:
        torch.set_num_threads(host_threads)


def agree_on_num_kv_blocks(worker: Worker) -> int:
    """Make every rank's KV pool the smallest any rank proposed; return that size.

    Ranks size their pools from their own free memory, but a block id must mean the same
    block on every rank.
    """
    num_blocks = min_over_ranks(worker.num_kv_blocks)
    if num_blocks < worker.num_kv_blocks:
        key_cache = worker.kv_caches[0][0]
        worker.kv_caches = []  # free the larger pool before allocating the smaller one
        worker.kv_caches = allocate_kv_cache(
            worker.config.model, num_blocks, worker.block_size, key_cache.shape[2], key_cache.dtype, key_cache.device
        )
        worker.num_kv_blocks = num_blocks
    return num_blocks


def serve_steps(config: EngineConfig, build_worker: WorkerFactory, state: ParallelState) -> None:
    """Rank ``state.rank`` > 0: build this rank's worker, then run rank 0's steps until it sends None."""
    worker = build_worker(config_for_rank(config, state.local_rank), state.rank, state.world_size)
    agree_on_num_kv_blocks(worker)
    while (step := broadcast_from_driver(None)) is not None:
        assert isinstance(step, StepInput), type(step)
        sampled_before = None
        if step.num_sampled_before:
            buffer = torch.empty(step.num_sampled_before, dtype=torch.int64, device=worker.device)
            sampled_before = broadcast_tensor_from_driver(buffer)
        worker.execute(step, sampled_before)
    worker.close(wait=True)
    destroy_distributed()


def make_executor(config: EngineConfig, build_worker: WorkerFactory, *, timeout_s: float | None = None) -> Executor:
    """The executor for ``config``: in this process at TP=1, else rank 0 of a tensor-parallel group.

    Under torchrun every rank calls this with the same arguments. On rank 0 it returns the
    executor; on every other rank it serves steps until rank 0 shuts down, then exits the
    process with status 0 (it never returns there). Without torchrun, TP=N spawns ranks
    1..N-1 from this process.
    """
    world_size = config.parallel.tensor_parallel_size
    if torch.device(config.device.device).type == "xla":
        return UniprocExecutor(config, build_worker)  # tensor parallelism inside its graphs (neuron_llm.xla.spmd)
    # A one-device engine beside rank 0 of a running group (a draft model) is none of the
    # launcher's business: its ranks are that group's.
    env = None if world_size == 1 and parallel_state().world_size > 1 else torchrun_env()
    if world_size > 1:
        _check_devices(config.device.device, world_size, env)
    if env is not None:
        _check_world_size(env.world_size, world_size)
        if env.rank > 0:
            leave_stop_signals_to_rank_0()
            timeout_s = config.parallel.distributed_timeout if timeout_s is None else timeout_s
            state = init_from_torchrun(distributed_backend(config.device.device), timeout_s=timeout_s)
            serve_steps(config, build_worker, state)
            raise SystemExit(0)
    if world_size == 1:
        return UniprocExecutor(config, build_worker)
    return MultiprocExecutor(config, build_worker, timeout_s=timeout_s)


def _check_devices(device: str, tensor_parallel_size: int, env: TorchrunEnv | None) -> None:
    """Each rank runs on cuda:<its LOCAL_RANK> (``config_for_rank``): an index would be dropped
    on the ranks and kept by rank 0's engine, which makes its seeded generators there; and
    that GPU must exist (a spawned rank failing on it would be noticed only after a timeout)."""
    parsed = torch.device(device)
    if parsed.type != "cuda":
        return
    if parsed.index is not None:
        raise ValueError(
            f"device={device!r} with tensor_parallel_size={tensor_parallel_size}: each rank runs on "
            "cuda:<its LOCAL_RANK>; pass device='cuda' (pick the GPUs with CUDA_VISIBLE_DEVICES)"
        )
    needed = tensor_parallel_size if env is None else env.local_rank + 1
    if needed > (visible := torch.cuda.device_count()):
        raise ValueError(
            f"tensor_parallel_size={tensor_parallel_size} needs GPU cuda:{needed - 1} but {visible} are visible "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})"
        )


def _check_world_size(launched: int, tensor_parallel_size: int) -> None:
    if launched != tensor_parallel_size:
        raise ValueError(
            f"the launcher started WORLD_SIZE={launched} processes but tensor_parallel_size={tensor_parallel_size}; "
            "start one process per tensor-parallel rank"
        )


def _serve_spawned_rank(
    rank: int, world_size: int, store: dist.Store, config: EngineConfig, build_worker: WorkerFactory, timeout_s: float
) -> None:
    if torch.device(config.device.device).type == "cpu":
        share_host_threads(world_size)
    backend = distributed_backend(config.device.device)
    with gloo_on_loopback():
        state = init_distributed(world_size, rank, backend, store=store, timeout_s=timeout_s)
    serve_steps(config, build_worker, state)

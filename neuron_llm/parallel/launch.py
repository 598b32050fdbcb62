"""Starting the ranks of a tensor-parallel group: one process per device.

Two ways, chosen by how the program was started:

- **library-spawned** (``python serve.py``): the driver process is rank 0; it spawns ranks
  1..N-1 with the ``spawn`` start method (a fresh interpreter: CUDA and fork do not mix) and
  they meet through a TCP store on 127.0.0.1 that rank 0 hosts on a free port. ``RankProcesses``
  watches them: a rank that fails sends its traceback back before it exits.
- **torchrun** (``torchrun --nproc-per-node N serve.py``): every rank runs the same script
  and finds the others through RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT.

Either way rank ``r`` on CUDA uses GPU ``LOCAL_RANK`` (``cuda:r`` when spawned) over NCCL;
on the CPU the ranks talk over gloo.
"""

from __future__ import annotations

import dataclasses
import multiprocessing.connection
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from multiprocessing.process import BaseProcess
from multiprocessing.util import Finalize
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from neuron_llm.config import EngineConfig

_HOST = "127.0.0.1"
_IFF_LOOPBACK = 0x8
"""The flag of the loopback interface in Linux's /sys/class/net/<name>/flags."""
_READY_KEY = "neuron_llm/ready/{rank}"
POLL_S = 0.05
_REPORT_GRACE_S = 2.0
"""A failing rank reports before its connections close, so this wait only delays errors that
rank 0 raised itself (then no report comes)."""
STOP_GRACE_S = 10.0
_MAX_REPORT_CHARS = 8192
"""The tail of a failed rank's traceback it sends: several fit a pipe's buffer (64 KiB)."""


class WorkerError(RuntimeError):
    """A tensor-parallel rank other than 0 failed; the message holds what it reported."""


def distributed_backend(device: str) -> str:
    """The ``torch.distributed`` backend for ``device``: NCCL on CUDA, gloo on the CPU."""
    kind = torch.device(device).type
    if kind == "cuda":
        return "nccl"
    if kind == "cpu":
        return "gloo"
    raise ValueError(f"device={device!r}: tensor parallelism over torch.distributed runs on 'cpu' or 'cuda'")


def config_for_rank(config: EngineConfig, local_rank: int) -> EngineConfig:
    """``config`` with the device of the rank whose LOCAL_RANK is ``local_rank`` (``cuda:<local_rank>``)."""
    if torch.device(config.device.device).type != "cuda":
        return config
    device = dataclasses.replace(config.device, device=f"cuda:{local_rank}")
    return dataclasses.replace(config, device=device)


def share_host_threads(world_size: int) -> int:
    """Give this rank its share of the host's cores, never more threads than it had: ranks on
    one CPU would otherwise oversubscribe it. Returns the number it had."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(before, (os.cpu_count() or 1) // world_size)))
    return before


RankTarget = Callable[..., None]
"""What a spawned rank runs: ``target(rank, world_size, store, *args)``."""


class RankProcesses:
    """Ranks 1..``world_size - 1``, spawned as child processes of rank 0, and their failure reports.

    The children run ``target(rank, world_size, store, *args)``; ``target`` and ``args`` must
    be picklable (module-level functions, plain data). ``store`` is the TCP store rank 0
    hosts, through which all ranks join the process group (``init_distributed(store=...)``).
    """

    def __init__(self, world_size: int, target: RankTarget, args: tuple[Any, ...], timeout_s: float) -> None:
        self.world_size = world_size
        self.timeout_s = timeout_s
        # Port 0: the OS picks a free port, so two groups on one host never collide. The socket is
        # bound here because the store itself would listen on every interface, not 127.0.0.1 alone.
        listener = socket.create_server((_HOST, 0))
        port = listener.getsockname()[1]
        self.store: dist.TCPStore | None = dist.TCPStore(
            _HOST,
            port,
            world_size,
            is_master=True,
            timeout=timedelta(seconds=timeout_s),
            wait_for_workers=False,
            master_listen_fd=listener.detach(),
        )
        context = mp.get_context("spawn")
        self._reports = context.SimpleQueue()
        self._received: list[tuple[int, str]] = []
        """Reports read from the queue so far: every ``failure`` returns them, so a caller that
        polled and dropped one (its collective failed at the same moment) cannot lose it."""
        # Daemonic: children are terminated when the driver exits without shutting down.
        self._processes = [
            context.Process(
                target=_run_rank,
                args=(rank, world_size, self.store.port, timeout_s, self._reports, target, args),
                name=f"neuron-llm-rank-{rank}",
                daemon=True,
            )
            for rank in range(1, world_size)
        ]
        for process in self._processes:
            process.start()
        # At exit, before multiprocessing joins its daemonic children, which ignore the SIGTERM
        # it sends them (``leave_stop_signals_to_rank_0``) and would be waited for forever.
        Finalize(self, _kill, args=(self._processes,), exitpriority=10)

    def wait_until_ready(self) -> None:
        """Return once every child has connected to the store; ``WorkerError`` if one dies first.

        Checked before rank 0 joins the process group, whose own wait could not notice a dead child.
        """
        keys = [_READY_KEY.format(rank=rank) for rank in range(1, self.world_size)]
        deadline = time.monotonic() + self.timeout_s
        while not self.store.check(keys):
            failure = self.failure(wait_s=0)
            if failure is not None:
                raise failure
            if time.monotonic() > deadline:
                raise WorkerError(f"tensor-parallel ranks did not start within {self.timeout_s:g} s")
            time.sleep(POLL_S)

    def all_running(self) -> bool:
        """Whether no child has exited; unlike ``failure``, safe to ask from any thread."""
        return all(process.exitcode is None for process in self._processes)

    def failure(self, wait_s: float = _REPORT_GRACE_S) -> WorkerError | None:
        """What failed children reported, or their exit codes, waiting up to ``wait_s`` for news.

        A child that exited without a report (killed: the OOM killer's SIGKILL) comes first: the
        others then fail in their collectives, and their reports only say that a peer went away.
        """
        deadline = time.monotonic() + wait_s
        while True:
            # Exits first: a child writes its report before it exits, so reports drained after
            # seeing an exit include that child's (the other order can see the exit alone).
            exited = [(rank, p) for rank, p in enumerate(self._processes, 1) if p.exitcode not in (None, 0)]
            reports = self._receive_reports()
            reported = {rank for rank, _ in reports}
            silent = [
                f"{p.name} exited with code {p.exitcode} (see its stderr)" for r, p in exited if r not in reported
            ]
            if silent or reports:
                return WorkerError(
                    "\n".join([*silent, *(f"tensor-parallel rank {r} failed:\n{tb}" for r, tb in reports)])
                )
            if time.monotonic() >= deadline:
                return None
            time.sleep(POLL_S)

    def stop(self, graceful: bool) -> None:
        """Wait for the children to exit (``graceful``: after rank 0 told them to), then end stragglers."""
        if graceful:
            deadline = time.monotonic() + STOP_GRACE_S
            for process in self._processes:
                process.join(max(0.0, deadline - time.monotonic()))
        _kill(self._processes)
        # Its listening port would otherwise stay open until this object is collected (the
        # process group holds its own reference until it is destroyed).
        self.store = None

    def _receive_reports(self) -> list[tuple[int, str]]:
        while not self._reports.empty():
            self._received.append(self._reports.get())
        return self._received


@contextmanager
def gloo_on_loopback() -> Iterator[None]:
    """Have the gloo groups made in this block (the CPU model group, the control group that
    carries pickled step inputs) listen on the loopback interface, as the store does: gloo
    otherwise listens on the address the hostname resolves to, reachable from the network on
    most cloud hosts. For the ranks the library spawns, which share one host. A
    GLOO_SOCKET_IFNAME set by the user is kept; nothing changes where the loopback interface
    cannot be found (it is read from Linux's /sys/class/net)."""
    loopback = None if "GLOO_SOCKET_IFNAME" in os.environ else _loopback_interface()
    if loopback is None:
        yield
        return
    os.environ["GLOO_SOCKET_IFNAME"] = loopback
    try:
        yield
    finally:
        del os.environ["GLOO_SOCKET_IFNAME"]


def _loopback_interface() -> str | None:
    for _, name in socket.if_nameindex():
        try:
            flags = int(Path(f"/sys/class/net/{name}/flags").read_text(), 16)
        except (OSError, ValueError):
            continue
        if flags & _IFF_LOOPBACK:
            return name
    return None


def _kill(processes: list[BaseProcess]) -> None:
    # SIGKILL: the ranks ignore SIGTERM.
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()


def leave_stop_signals_to_rank_0() -> None:
    """Ignore SIGINT and SIGTERM on a rank above 0: rank 0 ends it when it shuts down.

    Ctrl-C in a terminal, systemd stopping a service and torchrun forward the signal to every
    process of the group, and a rank that died of it would fail the requests rank 0 is
    draining. Only the main thread may set handlers; elsewhere the signals stay as they are.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _exit_with(sentinel: int) -> None:
    multiprocessing.connection.wait([sentinel])
    os._exit(1)


def _run_rank(
    rank: int,
    world_size: int,
    port: int,
    timeout_s: float,
    reports: Any,
    target: RankTarget,
    args: tuple[Any, ...],
) -> None:
    """Entry point of a spawned rank: join the store, run ``target``, report any failure to rank 0."""
    leave_stop_signals_to_rank_0()
    # Rank 0 ends this rank; should rank 0 die first (SIGKILL, while this one loads), so does this.
    parent = mp.parent_process()
    if parent is not None:
        threading.Thread(
            target=_exit_with, args=(parent.sentinel,), name="neuron-llm-parent-watch", daemon=True
        ).start()
    try:
        store = dist.TCPStore(_HOST, port, world_size, is_master=False, timeout=timedelta(seconds=timeout_s))
        store.set(_READY_KEY.format(rank=rank), "1")
        target(rank, world_size, store, *args)
    except BaseException:  # noqa: BLE001 - whatever ends this rank, rank 0 must hear why
        report = traceback.format_exc()
        if len(report) > _MAX_REPORT_CHARS:
            # A put larger than the pipe blocks until rank 0 reads, which it may do only after
            # its own collective with this rank fails: after the timeout.
            report = "[... earlier lines cut]\n" + report[-_MAX_REPORT_CHARS:]
        reports.put((rank, report))
        sys.exit(1)

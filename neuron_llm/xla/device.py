"""The XLA device, graph boundaries and the compile/execute counters.

torch_xla is imported inside each function, so importing this module never needs it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType

import torch


def import_torch_xla() -> ModuleType:
    """``torch_xla``, or an ImportError that says how to get it."""
    try:
        import torch_xla
    except ImportError as e:
        raise ImportError(
            "the neuron backend's graphs need torch-xla (torch-neuronx on Neuron); "
            "scripts/xla_env.sh creates an environment with torch 2.9 and torch-xla 2.9"
        ) from e
    return torch_xla


def xla_device() -> torch.device:
    """The default XLA device (a NeuronCore under torch-neuronx, the host CPU with PJRT_DEVICE=CPU)."""
    return import_torch_xla().device()


def sync() -> None:
    """Cut the lazy graph here: compile it (or reuse the cached one) and launch it, asynchronously."""
    import_torch_xla().sync()


def wait() -> None:
    """Block until every launched graph has finished (a host sync; keep it out of the step)."""
    import_torch_xla()
    import torch_xla.core.xla_model as xm

    xm.wait_device_ops()


def compile_count() -> int:
    """Graphs compiled by this process so far (torch-xla's ``CompileTime`` metric)."""
    return _metric_count("CompileTime")


def execution_count() -> int:
    """Graphs executed by this process so far, once those launched have finished (``ExecuteTime``)."""
    wait()
    return _metric_count("ExecuteTime")


def _metric_count(name: str) -> int:
    import_torch_xla()
    from torch_xla.debug import metrics

    data = metrics.metric_data(name)
    return 0 if data is None else int(data[0])


@dataclass
class GraphCounts:
    """Compilations and executions seen over a block of code (filled in when the block exits)."""

    compilations: int = 0
    executions: int = 0


@contextmanager
def count_graphs() -> Iterator[GraphCounts]:
    """Measure the graphs compiled and executed inside a ``with`` block::

    with count_graphs() as counts:
        worker.execute(step)
    assert counts.compilations == 0 and counts.executions == 1
    """
    counts = GraphCounts()
    # Executions first: waiting for them also lets any compile launched with them finish.
    executions, compilations = execution_count(), compile_count()
    yield counts
    counts.executions = execution_count() - executions
    counts.compilations = compile_count() - compilations

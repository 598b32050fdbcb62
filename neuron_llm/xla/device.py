"""The XLA device, graph boundaries and the compile/execute counters.

torch_xla is imported inside each function, so importing this module never needs it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
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


def inline_python_numbers() -> None:
    """Trace Python numbers (eps, the attention scale) as constants, not scalar parameters.

    As torch-xla's own StableHLO export does: the graphs then hold every value they use, and
    the HLO exported for neuronx-cc is the graph the engine serves. The setting is the
    process's; an XLA worker owns its process.
    """
    import_torch_xla()._XLAC._set_xla_all_numbers_special_scalars(True)


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


def to_host(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Copy computed XLA tensors to the CPU in one transfer (after ``sync``, this runs no graph)."""
    return import_torch_xla()._XLAC._xla_get_cpu_tensors(list(tensors))


def transferred_bytes() -> int:
    """Bytes copied from the device to the host by this process so far (``InboundData``)."""
    import_torch_xla()
    from torch_xla.debug import metrics

    data = metrics.metric_data("InboundData")
    return 0 if data is None else int(data[1])


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
    """Graphs and host reads seen over a block of code (filled in when the block exits)."""

    compilations: int = 0
    executions: int = 0
    transfers: int = 0
    """Copies from the device to the host (``TransferFromDeviceTime``); one may carry several tensors."""
    transferred_bytes: int = 0
    """Bytes those copies carried (``InboundData``)."""


@contextmanager
def count_graphs() -> Iterator[GraphCounts]:
    """Measure the graphs compiled and executed, and the host reads, inside a ``with`` block::

    with count_graphs() as counts:
        worker.execute(step)
    assert counts.compilations == 0 and counts.executions == 1
    """
    counts = GraphCounts()
    # Executions first: waiting for them also lets any compile launched with them finish.
    executions, compilations = execution_count(), compile_count()
    transfers, num_bytes = _metric_count("TransferFromDeviceTime"), transferred_bytes()
    yield counts
    counts.executions = execution_count() - executions
    counts.compilations = compile_count() - compilations
    counts.transfers = _metric_count("TransferFromDeviceTime") - transfers
    counts.transferred_bytes = transferred_bytes() - num_bytes

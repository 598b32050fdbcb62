"""torch-xla helpers: the device, graph boundaries, compile/execute counters and HLO export.

torch-neuronx runs PyTorch through torch-xla, and torch-xla runs the same graphs on the CPU
(``PJRT_DEVICE=CPU``), which is how the neuron backend is verified without Neuron hardware.
torch_xla is imported only inside functions, so ``import neuron_llm`` never needs it.
"""

from __future__ import annotations

from neuron_llm.xla.device import (
    GraphCounts,
    compile_count,
    count_graphs,
    execution_count,
    import_torch_xla,
    sync,
    to_host,
    transferred_bytes,
    wait,
    xla_device,
)
from neuron_llm.xla.hlo import (
    HloShape,
    entry_parameter_shapes,
    entry_parameter_splits,
    graph_order,
    hlo_module_proto,
    hlo_text,
)

__all__ = [
    "GraphCounts",
    "HloShape",
    "compile_count",
    "count_graphs",
    "entry_parameter_shapes",
    "entry_parameter_splits",
    "execution_count",
    "graph_order",
    "hlo_module_proto",
    "hlo_text",
    "import_torch_xla",
    "sync",
    "to_host",
    "transferred_bytes",
    "wait",
    "xla_device",
]

"""Launch helpers shared by the kernels: programmatic dependent launch, and split counters.

**Programmatic dependent launch (PDL)**, for the kernels of a decode step.

A decode step is hundreds of short kernels in a row, and on a Hopper GPU each boundary
between two of them costs microseconds in which the GPU drains one grid and starts the next.
With PDL (compute capability 9.0+), a kernel launched with ``launch_pdl=True`` may start
while the kernel before it is still running: its programs first do what needs nothing from
that kernel (an int8 GEMV loads its first weight tile: weights are never written by a
kernel), then ``wait_for_inputs`` blocks until the kernel before has finished and its
writes are visible, and lets the kernel after launch in turn.

Every kernel launched with PDL must call ``wait_for_inputs`` before it reads or writes any
memory another kernel touches, on every path, so that the ordering of the whole stream
holds link by link. Kernels launched without it (cuBLAS, PyTorch's) are ordered as usual.

**Split counters.** A kernel that splits one output over several programs (split K, split
context) lets the last program to finish combine the partial results: each program stores
its part, counts itself in with an atomic add, and the one that sees the count complete
sums the parts in a fixed order (deterministic) and resets the counter to zero. One launch,
no second pass. The counters are one int32 buffer per device, zero between calls, allocated
at the first call that needs them: make that call before capturing a CUDA graph, and don't
run such kernels on two streams of one device at once.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


@functools.cache
def _supports_pdl(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9


def use_pdl(device: torch.device) -> bool:
    """Launch with PDL on ``device``: a CUDA GPU of compute capability 9.0+, unless ``NEURON_LLM_PDL=0``."""
    if device.type != "cuda" or os.environ.get("NEURON_LLM_PDL", "1") == "0":
        return False
    return _supports_pdl(device)


def pdl(device: torch.device, *, reads_fresh_copy: bool = False) -> dict[str, bool]:
    """The launch arguments of a kernel with a ``USE_PDL`` flag: PDL and the kernel's wait come
    together, since a kernel launched early that did not wait would race the one before it.

    ``reads_fresh_copy``: a tensor the kernel reads before its wait (a weight) was just copied by
    the caller (made contiguous), so a kernel wrote it: the launch then goes in stream order.
    """
    use = use_pdl(device) and not reads_fresh_copy
    return {"USE_PDL": use, "launch_pdl": use}


_SPLIT_COUNTERS: dict[torch.device, list[torch.Tensor]] = {}
_MIN_COUNTERS = 1 << 16


def split_counters(device: torch.device, count: int) -> torch.Tensor:
    """The device's split counters (int32, all zero between calls), at least ``count`` of them.

    A larger need gets a new buffer; the smaller ones are kept, since CUDA graphs captured
    before may still use them.
    """
    buffers = _SPLIT_COUNTERS.setdefault(device, [])
    if not buffers or buffers[-1].numel() < count:
        buffers.append(torch.zeros(max(count, _MIN_COUNTERS), dtype=torch.int32, device=device))
    return buffers[-1]


@triton.jit
def wait_for_inputs(USE_PDL: tl.constexpr):
    """Wait for the kernel before (and its writes), then let the kernel after launch."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


def check_per_row(name: str, values: torch.Tensor, num_rows: int) -> None:
    """Refuse ``values`` unless it holds one value per row, contiguously: kernels read row r's at offset r."""
    if values.shape != (num_rows,) or values.stride(0) != 1:
        raise ValueError(
            f"{name} must be a contiguous [{num_rows}] tensor (one value per row), "
            f"got shape {tuple(values.shape)}, strides {values.stride()}"
        )

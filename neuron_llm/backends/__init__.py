"""The single dispatch point from the library to hardware-specific code.

A backend is chosen once, when an engine is built, with ``get_backend(name)``; device
packages are imported lazily inside the backend that needs them.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

from neuron_llm.backends.base import Backend

BACKEND_NAMES = ("torch", "cuda", "neuron")


def default_backend_name(device: str) -> str:
    """The backend a device runs by default: ``cuda`` on NVIDIA GPUs when Triton is installed,
    ``neuron`` on the XLA device, ``torch`` otherwise."""
    kind = device.split(":")[0]
    if kind == "xla":
        return "neuron"
    if kind == "cuda" and importlib.util.find_spec("triton") is not None:
        return "cuda"
    return "torch"


def get_backend(name: str, nki_kernels: Sequence[str] | None = ()) -> Backend:
    """Return the backend called ``name`` (one of ``BACKEND_NAMES``); the neuron backend with
    the NKI kernels named."""
    if nki_kernels and name != "neuron":
        raise ValueError(f"nki_kernels={nki_kernels!r}: NKI kernels run in the neuron backend, not {name!r}")
    if name == "torch":
        from neuron_llm.backends.torch_backend import TorchBackend

        return TorchBackend()
    if name == "cuda":
        from neuron_llm.backends.cuda.backend import CudaBackend

        return CudaBackend()
    if name == "neuron":
        from neuron_llm.backends.neuron import NeuronBackend

        return NeuronBackend(nki_kernels)
    raise ValueError(f"backend={name!r} is not available; choose one of {list(BACKEND_NAMES)}")


__all__ = ["BACKEND_NAMES", "Backend", "default_backend_name", "get_backend"]

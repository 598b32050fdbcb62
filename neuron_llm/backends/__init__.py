"""The single dispatch point from the library to hardware-specific code.

A backend is chosen once, when an engine is built, with ``get_backend(name)``; device
packages are imported lazily inside the backend that needs them.
"""

from __future__ import annotations

from neuron_llm.backends.base import Backend

BACKEND_NAMES = ("torch", "neuron")


def get_backend(name: str) -> Backend:
    """Return the backend called ``name`` (one of ``BACKEND_NAMES``)."""
    if name == "torch":
        from neuron_llm.backends.torch_backend import TorchBackend

        return TorchBackend()
    if name == "neuron":
        from neuron_llm.backends.neuron import NeuronBackend

        return NeuronBackend()
    raise ValueError(f"backend={name!r} is not available; choose one of {list(BACKEND_NAMES)}")


__all__ = ["BACKEND_NAMES", "Backend", "get_backend"]

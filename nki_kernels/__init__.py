"""NKI kernels for Neuron devices, each beside a NumPy reference of its tiles.

A kernel module holds three things: the NKI kernel (compiled by ``nki.jit`` where the
Neuron SDK's ``neuronxcc.nki`` imports, never called elsewhere), a NumPy function that walks
the same tiles in the same order with the same arithmetic, and the torch wrapper that lays
the inputs out for the kernel inside a traced XLA graph. The NumPy tiles are checked against
the ``torch`` backend on any machine; the kernels against the NumPy tiles under
``nki.simulate_kernel`` where the SDK is.

They are written against NKI's first public API (``neuronxcc.nki``, the one for trn1/inf2
in the XLA-based torch-neuronx), which Neuron SDK 2.27 is the last to compile (2.28's
neuronx-cc refuses such kernels; 2.34 removes the namespace; the ``nki`` package that replaces it
supports Trn2 and Trn3 only, by NKI's FAQ from 2.29), and are off unless asked for
(``nki_kernels``): they have not run on a NeuronCore. Kernels are reached only through
``neuron_llm.backends.neuron``.
"""

from __future__ import annotations

KERNELS = ("decode_attention", "int8_matmul")
"""The kernels ``nki_kernels`` may name: paged attention of decode steps, and the int8
weight-only matmul (per-channel scales)."""


def import_error() -> str | None:
    """Why ``neuronxcc.nki`` does not import here, or None when it does."""
    try:
        import neuronxcc.nki  # noqa: F401
    except Exception as e:  # the PyPI placeholders raise more than ImportError
        return f"{type(e).__name__}: {e}"
    return None


def check(names: object) -> tuple[str, ...]:
    """``names`` (of ``KERNELS``; None for none) sorted; ``ValueError`` naming what is wrong with
    them, or why the SDK does not import."""
    if names is None:
        return ()
    if isinstance(names, str) or not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"nki_kernels={names!r}: must be a list of names from {KERNELS}")
    if unknown := sorted(set(names) - set(KERNELS)):
        raise ValueError(f"nki_kernels: unknown {unknown}; choose from {', '.join(KERNELS)}")
    if names and (error := import_error()) is not None:
        raise ValueError(f"nki_kernels={sorted(set(names))}: the Neuron SDK's neuronxcc.nki does not import ({error})")
    return tuple(sorted(set(names)))

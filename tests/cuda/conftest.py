"""Triton kernel tests: on the GPU when there is one, else in Triton's interpreter on the CPU.

Tests marked ``cuda`` skip without a GPU. Test modules call ``pytest.importorskip("triton")``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

from neuron_llm.quant.formats import FP8_DTYPE

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Read when a kernel is decorated, so before any kernel module is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _patch_interpreter_scalar_index() -> None:
    """Let the interpreter turn a scalar read from memory into a loop bound under numpy >= 2.4.

    Triton 3.6's interpreter holds scalars as numpy arrays of shape [1] and calls ``int()`` on
    them, which numpy 2.4 refuses (https://github.com/triton-lang/triton/issues/9171); the
    upstream fix squeezes first, as here.
    """
    try:
        from triton.runtime import interpreter
    except ImportError:
        return  # no triton: the test modules skip themselves
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:
        return  # another Triton layout: nothing to patch

    def patch_lang_tensor(tensor: type, scope: object) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_lang_tensor


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_interpreter_scalar_index()


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("cuda") is not None and not HAS_CUDA:
        pytest.skip("needs an NVIDIA GPU")


@pytest.fixture
def device() -> torch.device:
    """Where the kernels run: the GPU, or the CPU under Triton's interpreter."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


def kernel_dtypes(device: torch.device) -> list[torch.dtype]:
    """Activation dtypes to check: the interpreter's bf16 is wrong (truncating casts, a bad
    ``tl.dot`` once), so bf16 runs on the GPU only."""
    return [torch.bfloat16, torch.float16, torch.float32] if device.type == "cuda" else [torch.float32, torch.float16]


def relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    return ((out.double() - expected.double()).norm() / expected.double().norm()).item()


@pytest.fixture
def seeded() -> None:
    torch.manual_seed(0)


@pytest.fixture
def poison_empty(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make every ``torch.empty`` return NaN (floats, fp8 included) or -1 (integers): a kernel
    that leaves an output element unwritten fails its check."""
    empty = torch.empty

    def poisoned(*args: object, **kwargs: object) -> torch.Tensor:
        tensor = empty(*args, **kwargs)
        if tensor.dtype == FP8_DTYPE:
            tensor.view(torch.uint8).fill_(0x7F)  # e4m3fn NaN
        elif tensor.is_floating_point():
            tensor.fill_(float("nan"))
        else:
            tensor.fill_(-1)
        return tensor

    monkeypatch.setattr(torch, "empty", poisoned)
    yield

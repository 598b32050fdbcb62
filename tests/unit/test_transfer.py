"""Host-to-device copies: values and dtypes as torch.tensor would give them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neuron_llm.transfer import to_device


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.float32, torch.bool])
def test_lists_and_arrays_arrive_with_their_values(dtype: torch.dtype) -> None:
    values = [0, 3, 1, 7]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for source in (values, np.asarray(values)):
            tensor = to_device(source, dtype, device)
            assert tensor.dtype == dtype and tensor.device.type == device
            assert torch.equal(tensor.cpu(), torch.tensor(values, dtype=dtype))


@pytest.mark.parametrize(
    ("values", "dtype"),
    [
        ([0.1, 2.5, 1e-40, -3.4e38, 1 / 3], torch.float32),
        ([[1, 2, 3], [4, 5, 6]], torch.int32),
        ([True, False, True], torch.bool),
        ([], torch.int64),
        ([2**40, -1], torch.int64),
    ],
)
def test_python_lists_convert_as_torch_tensor_does(values: list, dtype: torch.dtype) -> None:
    """Lists go through numpy (faster for long ones): same values, rounding and shape."""
    tensor = to_device(values, dtype, "cpu")
    expected = torch.tensor(values, dtype=dtype)
    assert tensor.dtype == dtype and tensor.shape == expected.shape
    assert torch.equal(tensor, expected)

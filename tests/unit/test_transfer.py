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

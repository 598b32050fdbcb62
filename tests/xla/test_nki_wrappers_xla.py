"""The NKI kernels' torch wrappers trace into the step's graph: static shapes, no host read, the
CPU's values. (The kernels themselves need the Neuron SDK: tests/neuron.)"""

from __future__ import annotations

import pytest
import torch

torch_xla = pytest.importorskip("torch_xla")

from neuron_llm.xla import count_graphs, xla_device
from nki_kernels import decode_attention, int8_matmul
from tests.neuron.test_nki_kernels import decode_batch, int8_layer

pytestmark = pytest.mark.xla


def test_the_decode_attention_inputs_trace_into_one_graph_and_equal_the_cpus() -> None:
    torch.manual_seed(0)
    metadata = decode_batch([127, 128, 129, 3], 16, 9, num_padded_seqs=6, seed=0)
    pool = (1 + 8 + 8 + 9 + 1, 16, 2, 64)
    key_cache, value_cache = torch.randn(pool), torch.randn(pool)
    query = torch.randn(6, 8, 64)
    cpu = (query, key_cache, value_cache, metadata.block_tables, metadata.seq_lens)
    device = xla_device()
    with count_graphs() as counts:
        on_xla = decode_attention.kernel_inputs(*(tensor.to(device) for tensor in cpu))
        torch_xla.sync()
    assert counts.transfers == 0 and counts.executions == 1
    for got, want in zip(on_xla, decode_attention.kernel_inputs(*cpu), strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0)


def test_the_int8_matmul_layout_traces_into_one_graph_and_equals_the_cpus() -> None:
    torch.manual_seed(0)
    layer = int8_matmul.NkiInt8Linear(int8_layer(576, 300, bias=True))
    x = torch.randn(3, 576)
    out_t = torch.randn(layer.weight.shape[1], 3)  # what the kernel would hand back
    device = xla_device()
    with count_graphs() as counts:
        x_t, tile = int8_matmul.kernel_input(x.to(device), layer.weight.shape[0])
        out = int8_matmul.kernel_output(out_t.to(device), x.to(device), 300, layer.bias.to(device))
        torch_xla.sync()
    assert counts.transfers == 0 and counts.executions == 1
    want_x_t, want_tile = int8_matmul.kernel_input(x, layer.weight.shape[0])
    assert tile == want_tile
    torch.testing.assert_close(x_t.cpu(), want_x_t, rtol=0, atol=0)
    torch.testing.assert_close(out.cpu(), int8_matmul.kernel_output(out_t, x, 300, layer.bias), rtol=0, atol=0)

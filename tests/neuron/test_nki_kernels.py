"""The NKI kernels' tiles, in NumPy, against the torch backend; the kernels against their tiles
under NKI's simulator, where the Neuron SDK imports (nowhere on our machines)."""

from __future__ import annotations

import collections
import copy
import random

import numpy as np
import pytest
import torch

import nki_kernels
from neuron_llm import ops
from neuron_llm.backends import get_backend
from neuron_llm.backends.neuron import NeuronBackend
from neuron_llm.backends.torch_backend import TorchBackend
from neuron_llm.compile.artifact import fixed_options, manifest_options
from neuron_llm.config import CacheConfig, DeviceConfig, EngineConfig, ModelConfig, ParallelConfig
from neuron_llm.models.llama import LlamaForCausalLM
from neuron_llm.ops.metadata import AttentionMetadata
from neuron_llm.quant import reference
from neuron_llm.quant.convert import quantize_model
from neuron_llm.quant.formats import quantize_int8
from neuron_llm.quant.layers import Int8Linear, quantized_linears
from nki_kernels import decode_attention, int8_matmul

NKI_MISSING = nki_kernels.import_error()


def decode_batch(
    seq_lens: list[int], block_size: int, width_blocks: int, num_padded_seqs: int, seed: int
) -> AttentionMetadata:
    """A decode step's metadata over distinct shuffled blocks, block tables ``width_blocks`` wide."""
    rng = random.Random(seed)
    free = list(range(1, 1 + sum(-(-n // block_size) for n in seq_lens)))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(-(-n // block_size))] for n in seq_lens]
    return AttentionMetadata.build(
        [1] * len(seq_lens),
        seq_lens,
        tables,
        block_size,
        "cpu",
        num_padded_tokens=num_padded_seqs,
        num_padded_seqs=num_padded_seqs,
        max_blocks_per_seq=width_blocks,
    )


def numpy_of(tensor: torch.Tensor) -> np.ndarray:
    return tensor.numpy() if tensor.dtype != torch.bfloat16 else tensor.float().numpy()


# (seq_lens, block_size, table width in blocks): one key; a block's end; 127/128/129 keys around
# a tile's end; a context that fills a table whose keys are not a whole number of tiles.
DECODE_CASES = [
    ([1], 4, 2),
    ([4, 5, 16], 4, 8),
    ([127, 128, 129, 3], 16, 9),
    ([200, 1, 144], 16, 13),
]


@pytest.mark.parametrize("seq_lens, block_size, width_blocks", DECODE_CASES)
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim", [(4, 4, 64), (9, 3, 64), (8, 2, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_attention_tiles_match_the_torch_backend(
    seq_lens: list[int], block_size: int, width_blocks: int, num_heads: int, num_kv_heads: int, head_dim: int, dtype
) -> None:
    torch.manual_seed(len(seq_lens) * 100 + num_heads)
    metadata = decode_batch(seq_lens, block_size, width_blocks, num_padded_seqs=len(seq_lens) + 2, seed=num_heads)
    num_blocks = 1 + sum(-(-n // block_size) for n in seq_lens)
    pool = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache, value_cache = torch.randn(pool).to(dtype), torch.randn(pool).to(dtype)
    query = torch.randn(metadata.block_tables.shape[0], num_heads, head_dim).to(dtype)
    scale = head_dim**-0.5
    assert decode_attention.takes(query, key_cache, metadata.block_tables)

    inputs = decode_attention.kernel_inputs(query, key_cache, value_cache, metadata.block_tables, metadata.seq_lens)
    assert inputs[3].shape[1] % decode_attention.TILE == 0
    tiles = decode_attention.decode_attention_tiles(*map(numpy_of, inputs), scale=scale)

    # The reference, in fp32 from the same (rounded) inputs.
    expected = TorchBackend().paged_attention(query.float(), key_cache.float(), value_cache.float(), metadata, scale)
    real = len(seq_lens)
    assert np.isfinite(tiles).all()  # the padded sequences' rows too
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(torch.from_numpy(tiles[:real]).float(), expected[:real], rtol=tolerance, atol=tolerance)


def test_decode_attention_is_taken_only_for_a_token_a_sequence() -> None:
    metadata = decode_batch([5, 9], 4, 4, num_padded_seqs=2, seed=0)
    cache = torch.zeros(8, 4, 2, 64)
    assert decode_attention.takes(torch.zeros(2, 4, 64), cache, metadata.block_tables)
    assert not decode_attention.takes(torch.zeros(3, 4, 64), cache, metadata.block_tables)
    assert not decode_attention.takes(torch.zeros(2, 4, 256), torch.zeros(8, 4, 2, 256), metadata.block_tables)


def int8_layer(
    in_features: int, out_features: int, bias: bool, group_size: int | None = None, dtype: torch.dtype = torch.float32
) -> Int8Linear:
    layer = Int8Linear(in_features, out_features, bias=bias, group_size=group_size)
    weight, scale = quantize_int8(torch.randn(out_features, in_features), group_size)
    layer.weight.data.copy_(weight)
    layer.weight_scale.data.copy_(scale)
    if bias:
        layer.bias.data = torch.randn(out_features).to(dtype)  # the model's dtype, as loaded
    return layer


@pytest.mark.parametrize(
    "lead, in_features, out_features",
    # Decode rows; inputs and outputs off whole tiles (SmolLM2's 576); more rows than one PSUM
    # bank's 512 (two row blocks, the second padded); a batch of sequences.
    [((1,), 256, 128), ((7,), 576, 1000), ((600,), 128, 300), ((2, 5), 384, 256)],
)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_int8_matmul_tiles_through_the_layers_wrappers_match_the_reference(
    lead: tuple[int, ...], in_features: int, out_features: int, bias: bool, dtype: torch.dtype
) -> None:
    torch.manual_seed(in_features + out_features)
    layer = int8_layer(in_features, out_features, bias, dtype=dtype)
    nki_layer = int8_matmul.NkiInt8Linear(layer)
    assert nki_layer.weight.shape == (-(-in_features // 128) * 128, -(-out_features // 128) * 128)
    x = torch.randn(*lead, in_features).to(dtype)

    # NkiInt8Linear.forward with the tiles where the kernel would run.
    x_t, tile = int8_matmul.kernel_input(x, nki_layer.weight.shape[0])
    assert x_t.shape[1] % tile == 0
    out_t = int8_matmul.int8_matmul_tiles(numpy_of(x_t), nki_layer.weight.numpy(), nki_layer.weight_scale.numpy(), tile)
    out = int8_matmul.kernel_output(torch.from_numpy(out_t), x, out_features, nki_layer.bias)

    expected = reference.int8_linear(
        x.float(), layer.weight, layer.weight_scale, None if layer.bias is None else layer.bias.float(), None
    )
    assert out.shape == (*lead, out_features) and out.dtype == dtype
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2  # fp16 rounds the output's |values| of ~20
    torch.testing.assert_close(out.float(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize(
    "in_features, num_rows, itemsize", [(4096, 1, 2), (576, 513, 2), (4096, 5000, 2), (14336, 2048, 4)]
)
def test_row_blocks_fit_activation_bytes_and_share_the_rows_evenly(in_features, num_rows, itemsize) -> None:
    padded_in = -(-in_features // 128) * 128
    tile = int8_matmul.row_tile(padded_in, num_rows, itemsize)
    assert tile <= int8_matmul.MAX_ROW_TILE
    assert padded_in // 128 * tile * itemsize <= int8_matmul.ACTIVATION_BYTES
    blocks = -(-num_rows // tile)
    assert blocks * tile - num_rows < blocks  # less than a padded row a block
    # No fewer blocks would fit: a block of the rows shared between blocks - 1 would not.
    fewer = blocks - 1
    assert fewer == 0 or -(-num_rows // fewer) > min(
        int8_matmul.MAX_ROW_TILE, int8_matmul.ACTIVATION_BYTES // (padded_in // 128 * itemsize)
    )


def test_only_per_channel_int8_linears_are_replaced_and_a_model_without_any_is_refused() -> None:
    torch.manual_seed(0)
    per_channel, grouped = int8_layer(256, 128, False), int8_layer(256, 128, False, group_size=128)
    model = torch.nn.Sequential(per_channel, grouped)
    int8_matmul.replace_int8_linears(model)
    assert type(model[0]) is int8_matmul.NkiInt8Linear and model[1] is grouped
    replaced = model[0]
    int8_matmul.replace_int8_linears(model)  # the export, then the worker: the second changes nothing
    assert model[0] is replaced
    # Still an int8 linear to the model's accounting, its names and format kept.
    assert quantized_linears(model) == {"0": per_channel.format, "1": grouped.format}
    assert dict(model.named_parameters()).keys() == {"0.weight", "0.weight_scale", "1.weight", "1.weight_scale"}
    with pytest.raises(ValueError, match="per-channel scales, not groups of 128"):
        int8_matmul.NkiInt8Linear(grouped)
    with pytest.raises(ValueError, match="'int8_matmul' runs int8 linears with per-channel scales .* has none"):
        int8_matmul.replace_int8_linears(torch.nn.Sequential(grouped, torch.nn.Linear(4, 4)))


def test_nki_kernels_are_refused_with_a_reason() -> None:
    with pytest.raises(ValueError, match=r"unknown \['flash'\]; choose from decode_attention, int8_matmul"):
        DeviceConfig(device="xla", nki_kernels=("flash",))
    with pytest.raises(ValueError, match="NKI kernels run on Neuron"):
        DeviceConfig(device="cpu", nki_kernels=("decode_attention",))
    with pytest.raises(ValueError, match="must be a list of names"):
        DeviceConfig(device="xla", nki_kernels="int8_matmul")
    with pytest.raises(ValueError, match="NKI kernels run in the neuron backend, not 'torch'"):
        get_backend("torch", ["int8_matmul"])
    with pytest.raises(ValueError, match="nki_kernels='int8_matmul': must be a list of names"):
        get_backend("neuron", "int8_matmul")
    assert NeuronBackend().nki_kernels == NeuronBackend(None).nki_kernels == frozenset()
    assert DeviceConfig(device="xla", nki_kernels=None).nki_kernels == ()
    if NKI_MISSING is None:
        assert NeuronBackend(["int8_matmul", "decode_attention"]).nki_kernels == set(nki_kernels.KERNELS)
        return
    sdk = r"nki_kernels=\['decode_attention', 'int8_matmul'\]: the Neuron SDK's neuronxcc.nki does not import"
    with pytest.raises(ValueError, match=sdk):
        DeviceConfig(device="xla", nki_kernels=["int8_matmul", "decode_attention"])
    with pytest.raises(ValueError, match=sdk):
        NeuronBackend(["int8_matmul", "decode_attention"])


MODEL = ModelConfig(
    vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
)  # fmt: skip


def xla_device_with(kernels: tuple[str, ...]) -> DeviceConfig:
    """An XLA DeviceConfig naming ``kernels``, built past its own checks (the SDK is missing here)."""
    device = DeviceConfig(device="xla")
    object.__setattr__(device, "nki_kernels", kernels)
    return device


def test_nki_kernels_are_refused_under_tensor_parallelism_on_the_xla_device() -> None:
    with pytest.raises(ValueError, match="the NKI kernels run unsharded"):
        EngineConfig(
            model=MODEL, device=xla_device_with(("int8_matmul",)), parallel=ParallelConfig(tensor_parallel_size=2)
        )


@pytest.mark.parametrize("kernels", [(), ("decode_attention",)])
def test_an_artifact_manifest_records_nki_kernels_only_when_some_are_used(kernels: tuple[str, ...]) -> None:
    """Older versions refuse a manifest option they do not know: one without kernels loads in them."""
    config = EngineConfig(model=MODEL, device=xla_device_with(kernels), cache=CacheConfig(num_kv_blocks=16))
    assert fixed_options(config)["nki_kernels"] == list(kernels)
    assert manifest_options(config).get("nki_kernels") == (list(kernels) or None)


@pytest.fixture
def tiles_in_the_kernels_place(monkeypatch) -> collections.Counter:
    """The NumPy tiles stand in for the kernels (the SDK is not here), so that what surrounds a
    kernel runs: the backend's routing, the layers' swap and the wrappers around each call.
    Counts the calls."""
    calls: collections.Counter = collections.Counter()

    def attention(query_t, key_rows, value_rows, slots, bias, scale):
        calls["decode_attention"] += 1
        arrays = [numpy_of(t) for t in (query_t, key_rows, value_rows, slots, bias)]
        return torch.from_numpy(decode_attention.decode_attention_tiles(*arrays, scale=scale))

    def matmul(x_t, weight, scale, row_tile):
        calls["int8_matmul"] += 1
        tiles = int8_matmul.int8_matmul_tiles(numpy_of(x_t), weight.numpy(), scale.numpy(), row_tile)
        return torch.from_numpy(tiles)

    monkeypatch.setattr(nki_kernels, "import_error", lambda: None)
    for module, name, kernel in (
        (decode_attention, "decode_attention_kernel", attention),
        (int8_matmul, "int8_matmul_kernel", matmul),
    ):
        monkeypatch.setattr(module, "nki", object())  # past the wrappers' check for the SDK
        monkeypatch.setattr(module, name, kernel)
    return calls


def test_the_neuron_backend_calls_the_kernels_on_decode_steps_and_int8_layers(
    tiles_in_the_kernels_place, paged_runner
) -> None:
    calls = tiles_in_the_kernels_place
    torch.manual_seed(0)
    model = LlamaForCausalLM(MODEL)
    for parameter in model.parameters():
        torch.nn.init.normal_(parameter, std=0.2)  # peaked logits: greedy picks far from ties
    quantize_model(model, "int8-head")
    num_int8 = sum(type(m) is Int8Linear for m in model.modules())
    assert num_int8 == 1 + 7 * MODEL.num_hidden_layers  # the head, and q, k, v, o, gate, up, down
    with_kernels = copy.deepcopy(model)
    backend = NeuronBackend(["decode_attention", "int8_matmul"])
    backend.prepare_model(with_kernels)
    assert sum(isinstance(m, int8_matmul.NkiInt8Linear) for m in with_kernels.modules()) == num_int8
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [5, 3, 5], [8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2, 6, 4, 3]]

    with ops.using_backend(NeuronBackend()):
        expected_logits = paged_runner(model).logits(prompts)
        expected = paged_runner(model).greedy(prompts, 6)
    with ops.using_backend(backend):
        logits = paged_runner(with_kernels).logits(prompts)
        # A prefill step: every int8 layer once, and the XLA form of attention.
        assert calls["decode_attention"] == 0 and calls["int8_matmul"] == num_int8
        assert paged_runner(with_kernels).greedy(prompts, 6) == expected
    for got, want in zip(logits, expected_logits, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert calls["decode_attention"] == MODEL.num_hidden_layers * 5  # each of the 5 decode steps' layers


def test_the_neuron_backend_zeroes_a_padded_sequences_row_of_the_decode_kernel(tiles_in_the_kernels_place) -> None:
    torch.manual_seed(3)
    metadata = decode_batch([9, 1, 16], 4, 6, num_padded_seqs=5, seed=3)
    pool = (1 + 3 + 1 + 4, 4, 2, 16)
    key_cache, value_cache = torch.randn(pool), torch.randn(pool)
    query = torch.randn(5, 4, 16)
    out = NeuronBackend(["decode_attention"]).paged_attention(query, key_cache, value_cache, metadata, 0.25)
    assert tiles_in_the_kernels_place["decode_attention"] == 1
    expected = NeuronBackend().paged_attention(query, key_cache, value_cache, metadata, 0.25)
    assert out[3:].abs().max() == 0
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def needs_nki(test):
    """Marks a test that runs a kernel: under NKI's simulator, where the Neuron SDK imports."""
    skip = pytest.mark.skipif(NKI_MISSING is not None, reason=f"neuronxcc.nki does not import: {NKI_MISSING}")
    return pytest.mark.neuron(skip(test))


@needs_nki
@pytest.mark.parametrize("seq_lens, block_size, width_blocks", DECODE_CASES[2:])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_attention_kernel_simulates_to_its_tiles(seq_lens, block_size, width_blocks, dtype) -> None:
    from neuronxcc import nki

    torch.manual_seed(1)
    metadata = decode_batch(seq_lens, block_size, width_blocks, num_padded_seqs=len(seq_lens) + 1, seed=1)
    pool = (1 + sum(-(-n // block_size) for n in seq_lens), block_size, 2, 64)
    key_cache, value_cache = torch.randn(pool).to(dtype), torch.randn(pool).to(dtype)
    query = torch.randn(metadata.block_tables.shape[0], 8, 64).to(dtype)
    inputs = decode_attention.kernel_inputs(query, key_cache, value_cache, metadata.block_tables, metadata.seq_lens)
    arrays = [numpy_of(tensor) for tensor in inputs]
    simulated = nki.simulate_kernel(decode_attention.decode_attention_kernel, *arrays, scale=0.125)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3
    np.testing.assert_allclose(
        simulated[: len(seq_lens)].astype(np.float32),
        decode_attention.decode_attention_tiles(*arrays, scale=0.125)[: len(seq_lens)].astype(np.float32),
        rtol=tolerance,
        atol=tolerance,
    )


@needs_nki
@pytest.mark.parametrize("num_rows, in_features, out_features", [(1, 576, 1000), (600, 256, 384)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_int8_matmul_kernel_simulates_to_its_tiles(num_rows, in_features, out_features, dtype) -> None:
    from neuronxcc import nki

    torch.manual_seed(2)
    layer = int8_matmul.NkiInt8Linear(int8_layer(in_features, out_features, False))
    x_t, tile = int8_matmul.kernel_input(torch.randn(num_rows, in_features).to(dtype), layer.weight.shape[0])
    arrays = [numpy_of(x_t), layer.weight.numpy(), layer.weight_scale.numpy()]
    simulated = nki.simulate_kernel(int8_matmul.int8_matmul_kernel, *arrays, row_tile=tile)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    np.testing.assert_allclose(
        simulated.astype(np.float32),
        int8_matmul.int8_matmul_tiles(*arrays, tile).astype(np.float32),
        rtol=tolerance,
        atol=tolerance,
    )

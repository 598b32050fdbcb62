"""The fused Triton kernels (RMSNorm with the residual add, RoPE with the KV-cache write) against the model's layers.

On the CPU they run in Triton's interpreter (fp32, fp16; small shapes). Outputs the wrappers
allocate are poisoned with NaN (``torch.empty`` is patched) and caches start as NaN, so an
element left unwritten, or written where it should not be, fails the comparison.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

pytest.importorskip("triton")

from neuron_llm.backends.cuda.fused import fused_add_rms_norm, rms_norm, rotary_write_kv, silu_mul
from neuron_llm.backends.torch_backend import TorchBackend
from neuron_llm.layers.norm import RMSNorm
from neuron_llm.layers.rotary import RotaryEmbedding, apply_rotary
from tests.cuda.conftest import kernel_dtypes, relative_error

pytestmark = pytest.mark.usefixtures("seeded", "poison_empty")

# Relative error (by norm) allowed for each dtype: one rounding of the output.
TOLERANCE = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def make_norm(hidden: int, dtype: torch.dtype, device: torch.device, seed: int) -> RMSNorm:
    norm = RMSNorm(hidden, eps=1e-5).to(device=device, dtype=dtype).requires_grad_(False)
    norm.weight.copy_(1 + 0.5 * torch.randn(hidden, generator=torch.Generator().manual_seed(seed)))
    return norm


def float64_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xd = x.double()
    return weight.double() * xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize(("num_tokens", "hidden"), [(1, 64), (5, 100), (17, 1000), (3, 4096)])
def test_rms_norm_matches_layer(num_tokens: int, hidden: int, device: torch.device) -> None:
    for dtype in kernel_dtypes(device):
        norm = make_norm(hidden, dtype, device, seed=hidden)
        x = (torch.randn(num_tokens, hidden, device=device) * 3).to(dtype)
        out = rms_norm(x, norm.weight, norm.eps)
        assert out.dtype == dtype and out.shape == x.shape
        assert relative_error(out, norm(x)) < TOLERANCE[dtype]
        assert relative_error(out, float64_rms_norm(x, norm.weight, norm.eps)) < 2 * TOLERANCE[dtype] + 1e-6


@pytest.mark.parametrize(("num_tokens", "hidden"), [(1, 64), (7, 100), (3, 4096)])
def test_fused_add_rms_norm_matches_layer(num_tokens: int, hidden: int, device: torch.device) -> None:
    for dtype in kernel_dtypes(device):
        norm = make_norm(hidden, dtype, device, seed=hidden + 1)
        x = torch.randn(num_tokens, hidden, device=device).to(dtype)
        residual = (torch.randn(num_tokens, hidden, device=device) * 4).to(dtype)
        normed, new_residual = fused_add_rms_norm(x, residual, norm.weight, norm.eps)
        assert torch.equal(new_residual, x + residual)  # the model's add, in the input dtype
        assert relative_error(normed, norm(x + residual)) < TOLERANCE[dtype]


def test_rms_norm_shapes_strides_and_dtypes(device: torch.device) -> None:
    norm = make_norm(48, torch.float32, device, seed=0)
    x = torch.randn(2, 3, 96, device=device)[..., ::2]  # [2, 3, 48], stride 2 along features
    assert relative_error(rms_norm(x, norm.weight, 1e-5), norm(x)) < TOLERANCE[torch.float32]
    half = x.half()
    out = rms_norm(half, norm.weight, 1e-5)  # fp32 weight times an fp16 row: fp32, as in the layer
    assert out.dtype == torch.float32 and relative_error(out, norm(half)) < 1e-6
    normed, new_residual = fused_add_rms_norm(x, x, norm.weight, 1e-5)
    assert normed.shape == new_residual.shape == (2, 3, 48)
    assert rms_norm(x[:0], norm.weight, 1e-5).shape == (0, 3, 48)


def test_norm_rejects_bad_inputs(device: torch.device) -> None:
    x = torch.randn(4, 32, device=device)
    weight = torch.ones(32, device=device)
    with pytest.raises(ValueError, match="weight.shape"):
        rms_norm(x, weight[:16], 1e-5)
    with pytest.raises(ValueError, match="residual"):
        fused_add_rms_norm(x, x.half(), weight, 1e-5)
    with pytest.raises(ValueError, match="MAX_NORM_FEATURES"):
        rms_norm(torch.randn(1, 40000), torch.ones(40000), 1e-5)


def rotary_case(
    num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """query/key/value as views of one fused QKV output, cos/sin of random positions."""
    generator = torch.Generator().manual_seed(num_tokens * 31 + head_dim)
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=generator).to(dtype).to(device)
    query, key, value = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    positions = torch.randint(0, 8192, (num_tokens,), generator=generator).to(device)
    cos, sin = RotaryEmbedding(head_dim, 500000.0, None).to(device)(positions, dtype)
    return (
        query.view(num_tokens, num_heads, head_dim),
        key.view(num_tokens, num_kv_heads, head_dim),
        value.view(num_tokens, num_kv_heads, head_dim),
        cos,
        sin,
    )


def assert_same(out: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit-equal in 16-bit (each product and sum rounded as torch rounds); fp32 may fuse a multiply-add."""
    if out.dtype == torch.float32:
        assert relative_error(out.nan_to_num(0.0), expected.nan_to_num(0.0)) < 1e-6
        assert torch.equal(out.isnan(), expected.isnan())
    else:
        assert torch.equal(out.nan_to_num(7.0), expected.nan_to_num(7.0))


@pytest.mark.parametrize(
    ("num_tokens", "num_heads", "num_kv_heads", "head_dim"), [(1, 4, 2, 16), (7, 9, 3, 64), (13, 32, 8, 128)]
)
def test_rotary_write_kv_matches_reference(
    num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int, device: torch.device
) -> None:
    block_size, num_blocks, num_padding = 4, 9, 2
    for dtype in kernel_dtypes(device):
        query, key, value, cos, sin = rotary_case(
            num_tokens + num_padding, num_heads, num_kv_heads, head_dim, dtype, device
        )
        # Real tokens get distinct slots outside the null block 0; padding tokens all write slot 0.
        generator = torch.Generator().manual_seed(num_tokens)
        slots = block_size + torch.randperm((num_blocks - 1) * block_size, generator=generator)[:num_tokens]
        slot_mapping = torch.cat([slots, torch.zeros(num_padding, dtype=torch.int64)]).to(device)
        cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
        key_cache = torch.full(cache_shape, float("nan"), dtype=dtype, device=device)
        value_cache = torch.full(cache_shape, float("nan"), dtype=dtype, device=device)
        expected_key_cache, expected_value_cache = key_cache.clone(), value_cache.clone()

        query_out, key_out = rotary_write_kv(query, key, value, cos, sin, key_cache, value_cache, slot_mapping)
        expected_query, expected_key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
        TorchBackend().write_kv_cache(expected_key, value, expected_key_cache, expected_value_cache, slot_mapping)

        assert query_out.shape == query.shape and query_out.is_contiguous() and key_out.shape == key.shape
        assert_same(query_out, expected_query)
        assert_same(key_out, expected_key)
        # Block 0 took the padding tokens' writes, which land in any order.
        assert_same(key_cache[1:], expected_key_cache[1:])
        assert torch.equal(value_cache[1:].nan_to_num(7.0), expected_value_cache[1:].nan_to_num(7.0))


def test_rotary_write_kv_takes_two_dim_angles_and_int32_slots(device: torch.device) -> None:
    query, key, value, cos, sin = rotary_case(3, 4, 2, 32, torch.float32, device)
    key_cache = torch.zeros(2, 4, 2, 32, device=device)
    value_cache = torch.zeros_like(key_cache)
    slot_mapping = torch.tensor([5, 1, 6], dtype=torch.int32, device=device)
    query_out, key_out = rotary_write_kv(query, key, value, cos[:, 0], sin[:, 0], key_cache, value_cache, slot_mapping)
    assert_same(query_out, apply_rotary(query, cos, sin))
    assert_same(key_cache.view(-1, 2, 32)[slot_mapping.long()], key_out)
    assert torch.equal(value_cache.view(-1, 2, 32)[slot_mapping.long()], value)


def test_rotary_write_kv_rejects_bad_inputs(device: torch.device) -> None:
    query, key, value, cos, sin = rotary_case(3, 4, 2, 32, torch.float32, device)
    cache = torch.zeros(2, 4, 2, 32, device=device)
    slots = torch.arange(3, device=device)
    with pytest.raises(ValueError, match="key_cache"):
        rotary_write_kv(query, key, value, cos, sin, cache[:, :, :1], cache, slots)
    with pytest.raises(ValueError, match="contiguous"):
        rotary_write_kv(query, key, value, cos, sin, cache.transpose(0, 1), cache, slots)
    with pytest.raises(ValueError, match="slot_mapping"):
        rotary_write_kv(query, key, value, cos, sin, cache, cache.clone(), slots[:2])
    with pytest.raises(ValueError, match=r"slot_mapping must be a contiguous \[3\] tensor"):
        # Read as if contiguous, a strided column would name other tokens' slots (past the cache).
        rotary_write_kv(query, key, value, cos, sin, cache, cache.clone(), torch.arange(6, device=device)[::2])
    with pytest.raises(ValueError, match="cos.dtype"):
        rotary_write_kv(query, key, value, cos.half(), sin, cache, cache.clone(), slots)
    with pytest.raises(ValueError, match="even"):
        rotary_write_kv(query[..., :31], key[..., :31], value[..., :31], cos, sin, cache, cache.clone(), slots)


def captured(fn: Callable[[], object]) -> tuple[torch.cuda.CUDAGraph, object]:
    """Run ``fn`` once to compile its kernels, then capture it in a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    return graph, outputs


@pytest.mark.cuda
def test_fused_kernels_replay_in_a_cuda_graph(device: torch.device) -> None:
    dtype = torch.bfloat16
    norm = make_norm(256, dtype, device, seed=5)
    x = torch.randn(8, 256, device=device, dtype=dtype)
    residual = torch.randn(8, 256, device=device, dtype=dtype)
    query, key, value, cos, sin = rotary_case(8, 8, 2, 64, dtype, device)
    key_cache = torch.zeros(4, 4, 2, 64, device=device, dtype=dtype)
    value_cache = torch.zeros_like(key_cache)
    slot_mapping = torch.randperm(16, device=device)[:8]

    def step() -> tuple[torch.Tensor, ...]:
        normed, new_residual = fused_add_rms_norm(x, residual, norm.weight, norm.eps)
        query_out, key_out = rotary_write_kv(query, key, value, cos, sin, key_cache, value_cache, slot_mapping)
        return normed, new_residual, query_out, key_out

    graph, outputs = captured(step)
    for tensor in (x, residual, query, key, value):
        tensor.copy_(torch.randn_like(tensor))
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(outputs, step(), strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize(("num_tokens", "intermediate"), [(1, 8), (5, 1000), (17, 2304)])
def test_silu_mul_matches_the_reference(num_tokens: int, intermediate: int, device: torch.device) -> None:
    for dtype in kernel_dtypes(device):
        gate_up = (torch.randn(num_tokens, 2 * intermediate, device=device) * 3).to(dtype)
        gate, up = gate_up.chunk(2, dim=-1)
        expected = torch.nn.functional.silu(gate.double()) * up.double()
        out = silu_mul(gate_up)
        assert out.shape == (num_tokens, intermediate) and out.dtype == dtype
        assert relative_error(out.double(), expected) < (1e-6 if dtype == torch.float32 else 1e-2)
    with pytest.raises(ValueError, match="must be even"):
        silu_mul(torch.randn(2, 7, device=device))

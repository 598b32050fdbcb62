"""The quantized-linear kernels (int8 W8A16, fp8 W8A8 activation quantization, int8 W8A8) against the references.

On the CPU they run in Triton's interpreter (fp32, fp16; small shapes). Every output buffer
the wrappers allocate is poisoned with NaN first (``torch.empty`` is patched), so an element
the kernel forgets to write fails the comparison. References run in float64 on upcast inputs
(int8) or are the bit-exact quantization of ``neuron_llm.quant.formats`` (fp8).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from neuron_llm.backends.cuda.fp8 import (
    fp8_linear,
    fp8_scaled_mm,
    quantize_fp8_per_token,
    quantize_int8_per_token,
    rms_norm_quantize_fp8,
    silu_mul_quantize_fp8,
    silu_mul_quantize_int8,
)
from neuron_llm.backends.cuda.fused import rotary_write_kv, silu_mul
from neuron_llm.backends.cuda.int8_matmul import (
    CONVERT_MODES,
    DEEP_GEMV_K,
    Int8MatmulConfig,
    NormInput,
    ResidualAdd,
    RotaryWrite,
    _num_sms,
    default_config,
    fp8_rows_matmul,
    gemv_16bit,
    int8_linear,
    square_sums_buffer,
)
from neuron_llm.backends.cuda.w8a8 import w8a8_linear
from neuron_llm.layers.norm import RMSNorm
from neuron_llm.quant import reference
from neuron_llm.quant.formats import (
    FP8_DTYPE,
    FP8_MAX,
    FP8_MIN_ACTIVATION_SCALE,
    dequantize_int8,
    quantize_fp8_activation,
    quantize_fp8_weight,
    quantize_int8,
    quantize_int8_activation,
)
from tests.cuda.conftest import kernel_dtypes, relative_error

pytestmark = pytest.mark.usefixtures("seeded", "poison_empty")

# Relative error (by norm) allowed for each activation dtype: the output's own rounding.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# fp8 matmuls: use_fast_accum sums in the tensor cores' reduced-precision accumulator.
FP8_MATMUL_TOLERANCE = {torch.float32: 2e-3, torch.float16: 4e-3, torch.bfloat16: 1.6e-2}


def make_int8_linear(
    out_features: int, in_features: int, group_size: int | None, device: torch.device, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, scale, bias) of a random weight with its rows 1 and 2 zero (scale 1, all-zero q)."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator)
    weight[1:3] = 0
    q, scale = quantize_int8(weight, group_size)
    bias = torch.randn(out_features, generator=generator)
    return q.to(device), scale.to(device), bias.to(device)


def int8_expected(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, group_size: int | None
) -> torch.Tensor:
    out = x.double() @ dequantize_int8(q, scale, torch.float64, group_size).T
    return out if bias is None else out + bias.double()


@pytest.mark.parametrize("num_tokens", [1, 3, 17, 130])
@pytest.mark.parametrize(
    ("out_features", "in_features", "group_size"),
    [(37, 200, None), (64, 256, 128), (33, 300, 128), (40, 160, 100)],
)
def test_int8_linear_matches_reference(
    num_tokens: int, out_features: int, in_features: int, group_size: int | None, device: torch.device
) -> None:
    q, scale, bias = make_int8_linear(out_features, in_features, group_size, device, seed=num_tokens + in_features)
    for dtype in kernel_dtypes(device):
        x = torch.randn(num_tokens, in_features, device=device).to(dtype)
        for b in (None, bias.to(dtype)):
            out = int8_linear(x, q, scale, b, group_size)
            assert out.shape == (num_tokens, out_features) and out.dtype == dtype
            assert torch.isfinite(out).all()
            expected = int8_expected(x, q, scale, b, group_size)
            assert relative_error(out, expected) < TOLERANCE[dtype], (dtype, b is None)
        # The zero weight rows give exactly the bias.
        assert torch.equal(out[:, 1:3], bias.to(dtype)[1:3].expand(num_tokens, 2))


CONFIGS = [
    Int8MatmulConfig(block_m=1, block_n=16, block_k=32, convert="cvt", reduce_in_thread=False),
    Int8MatmulConfig(block_m=1, block_n=32, block_k=64, split_k=3, prefetch=True),
    Int8MatmulConfig(block_m=1, block_n=16, block_k=128, split_k=2, convert="add"),
    Int8MatmulConfig(block_m=1, block_n=64, block_k=64, split_k=2),
    Int8MatmulConfig(block_m=16, block_n=32, block_k=32, split_k=2),
    Int8MatmulConfig(block_m=32, block_n=64, block_k=64),
    Int8MatmulConfig(block_m=16, block_n=16, block_k=128, split_k=4),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"m{c.block_m}n{c.block_n}k{c.block_k}s{c.split_k}")
@pytest.mark.parametrize("group_size", [None, 32, 24])
def test_int8_linear_configs(config: Int8MatmulConfig, group_size: int | None, device: torch.device) -> None:
    """Every path: GEMV (with and without prefetch) and dot, split K (uneven last split too),
    per-tile and per-element group scales."""
    out_features, in_features = 50, 232
    q, scale, bias = make_int8_linear(out_features, in_features, group_size, device, seed=7)
    for num_tokens in (1, 3) if config.block_m == 1 else (1, 5, 40):
        x = torch.randn(num_tokens, in_features, device=device)
        out = int8_linear(x, q, scale, bias, group_size, config=config)
        assert relative_error(out, int8_expected(x, q, scale, bias, group_size)) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("block_m", [1, 16])
def test_int8_linear_reads_no_scale_past_k(block_m: int, device: torch.device) -> None:
    """split_k 3 of K's 16 blocks: the last split has steps starting past K, whose weights load
    as 0; the memory after the last row's scales holds inf, which 0 * inf would make NaN."""
    out_features, in_features, group_size = 16, 1000, 64
    q, scale, _ = make_int8_linear(out_features, in_features, group_size, device, seed=3)
    after_scales = torch.full((scale.numel() + 64,), float("inf"), device=device)
    after_scales[: scale.numel()] = scale.flatten()
    scale = after_scales[: scale.numel()].view_as(scale)
    config = Int8MatmulConfig(block_m=block_m, block_n=16, block_k=64, split_k=3, reduce_in_thread=False)
    x = torch.randn(3, in_features, device=device)
    out = int8_linear(x, q, scale, None, group_size, config=config)
    assert torch.isfinite(out).all()
    assert relative_error(out, int8_expected(x, q, scale, None, group_size)) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("reduce_in_thread", [True, False])
def test_int8_gemv_conversions_agree_on_every_byte(reduce_in_thread: bool, device: torch.device) -> None:
    """The three int8 -> float32 conversions of the GEMV give the same bits, over all 256 values."""
    out_features, in_features = 48, 512
    q = (torch.arange(out_features * in_features) % 256 - 128).to(torch.int8).reshape(out_features, in_features)
    q = q[:, torch.randperm(in_features, generator=torch.Generator().manual_seed(3))].to(device)
    scale = torch.rand(out_features, 1, device=device) + 0.5
    x = torch.randn(1, in_features, device=device).to(kernel_dtypes(device)[-1])
    outs = [
        int8_linear(x, q, scale, config=Int8MatmulConfig(1, 16, 128, convert=c, reduce_in_thread=reduce_in_thread))
        for c in CONVERT_MODES
    ]
    assert all(torch.equal(out, outs[0]) for out in outs[1:])
    assert relative_error(outs[0], int8_expected(x, q, scale, None, None)) < TOLERANCE[x.dtype]
    with pytest.raises(ValueError, match="convert='fast'"):
        Int8MatmulConfig(1, 16, 128, convert="fast")


@pytest.mark.parametrize(
    "config", [None, *CONFIGS], ids=lambda c: "default" if c is None else f"m{c.block_m}s{c.split_k}"
)
@pytest.mark.parametrize("group_size", [None, 32, 24])
def test_int8_linear_of_silu_mul_input_is_the_two_kernels(
    config: Int8MatmulConfig | None, group_size: int | None, device: torch.device
) -> None:
    """silu(gate) * up made inside the matmul gives the bits of silu_mul, then int8_linear."""
    out_features, in_features = 50, 232
    q, scale, bias = make_int8_linear(out_features, in_features, group_size, device, seed=5)
    for dtype in kernel_dtypes(device):
        for num_tokens in (1, 3, 20):
            gate_up = (3 * torch.randn(num_tokens, 2 * in_features, device=device)).to(dtype)
            b = bias.to(dtype)
            fused = int8_linear(gate_up, q, scale, b, group_size, config=config, silu_mul_input=True)
            assert torch.equal(fused, int8_linear(silu_mul(gate_up), q, scale, b, group_size, config=config))
            gate, up = gate_up.double().chunk(2, dim=-1)
            expected = int8_expected(F.silu(gate) * up, q, scale, b, group_size)
            assert relative_error(fused, expected) < TOLERANCE[dtype], (dtype, num_tokens)
    with pytest.raises(ValueError, match="2 \\* in_features"):
        int8_linear(gate_up[:, 1:], q, scale, silu_mul_input=True)


@pytest.mark.parametrize("in_features", [DEEP_GEMV_K + 72, 2 * DEEP_GEMV_K])
def test_int8_gemv_of_deep_tiles_matches_reference(in_features: int, device: torch.device) -> None:
    """One row over a long K takes the default's 2048-deep tiles (the last partly past an uneven
    K), plain and making SwiGLU in its loads."""
    out_features = 40
    assert default_config(1, out_features, in_features, None, _num_sms(device)).block_k == DEEP_GEMV_K
    q, scale, bias = make_int8_linear(out_features, in_features, None, device, seed=in_features)
    for dtype in kernel_dtypes(device):
        b = bias.to(dtype)
        x = torch.randn(1, in_features, device=device).to(dtype)
        out = int8_linear(x, q, scale, b)
        assert relative_error(out, int8_expected(x, q, scale, b, None)) < TOLERANCE[dtype], dtype
        assert torch.equal(out[:, 1:3], b[1:3].unsqueeze(0))  # the zero rows: the bias exactly
        gate_up = (3 * torch.randn(1, 2 * in_features, device=device)).to(dtype)
        fused = int8_linear(gate_up, q, scale, b, silu_mul_input=True)
        assert torch.equal(fused, int8_linear(silu_mul(gate_up), q, scale, b))


@pytest.mark.parametrize(
    "config", [None, CONFIGS[0], CONFIGS[1], CONFIGS[2]], ids=["default", "plain", "split3", "split2-add"]
)
@pytest.mark.parametrize("group_size", [None, 32])
def test_gemv_makes_swiglu_as_it_stores(
    config: Int8MatmulConfig | None, group_size: int | None, device: torch.device
) -> None:
    """silu_mul_output: the bits of the gate/up product then the silu_mul kernel, for int8 and
    16-bit weights, split K, and an intermediate size no tile divides."""
    intermediate, in_features = 37, 232
    q, scale, bias = make_int8_linear(2 * intermediate, in_features, group_size, device, seed=9)
    weight_16bit = (torch.randn(2 * intermediate, in_features) * 0.05).to(device)
    for dtype in kernel_dtypes(device):
        x = torch.randn(1, in_features, device=device).to(dtype)
        out = int8_linear(x, q, scale, bias.to(dtype), group_size, config=config, silu_mul_output=True)
        assert out.shape == (1, intermediate)
        assert torch.equal(out, silu_mul(int8_linear(x, q, scale, bias.to(dtype), group_size, config=config)))
        if dtype != torch.float32 and group_size is None:
            w = weight_16bit.to(dtype)
            out = gemv_16bit(x, w, config=config, silu_mul_output=True)
            assert torch.equal(out, silu_mul(gemv_16bit(x, w, config=config)))
    with pytest.raises(ValueError, match="GEMV"):
        int8_linear(x, q, scale, None, group_size, config=CONFIGS[4], silu_mul_output=True)
    with pytest.raises(ValueError, match="no silu_mul_input"):
        int8_linear(torch.cat([x, x], -1), q, scale, None, group_size, silu_mul_input=True, silu_mul_output=True)


@pytest.mark.parametrize(
    "config", [None, CONFIGS[0], CONFIGS[1], CONFIGS[3]], ids=["default", "plain", "split3-n32", "split2-n64"]
)
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_rotates_and_writes_the_cache_as_it_stores(
    config: Int8MatmulConfig | None, bias: bool, device: torch.device
) -> None:
    """rotary: the bits of the Q/K/V product then ``rotary_write_kv`` (query, both caches whole),
    for int8 and 16-bit weights, split K, and tiles wider than a head (halved to fit)."""
    num_heads, num_kv_heads, head_dim, in_features = 3, 2, 16, 232
    out_features = (num_heads + 2 * num_kv_heads) * head_dim
    q, scale, b = make_int8_linear(out_features, in_features, None, device, seed=12)
    weight_16bit = (torch.randn(out_features, in_features) * 0.05).to(device)
    slot = torch.tensor([6], device=device)
    for dtype in kernel_dtypes(device):
        x = torch.randn(1, in_features, device=device).to(dtype)
        cos, sin = (torch.randn(1, head_dim, device=device).to(dtype) for _ in range(2))
        b_dtype = b.to(dtype) if bias else None
        products = [(lambda **kw: int8_linear(x, q, scale, b_dtype, config=config, **kw))]
        if dtype != torch.float32:
            products.append(lambda **kw: gemv_16bit(x, weight_16bit.to(dtype), b_dtype, config=config, **kw))
        for product in products:
            caches = [torch.randn(3, 4, num_kv_heads, head_dim, device=device).to(dtype) for _ in range(2)]
            caches += [cache.clone() for cache in caches]
            query, key, value = product().split([num_heads * head_dim, *[num_kv_heads * head_dim] * 2], -1)
            expected, _ = rotary_write_kv(
                query.view(1, num_heads, head_dim), key.view(1, num_kv_heads, head_dim),
                value.view(1, num_kv_heads, head_dim), cos, sin, caches[0], caches[1], slot,
            )  # fmt: skip
            out = product(rotary=RotaryWrite(cos, sin, caches[2], caches[3], slot))
            assert out.shape == (1, num_heads * head_dim)
            assert torch.equal(out.view(1, num_heads, head_dim), expected)
            assert torch.equal(caches[2], caches[0]) and torch.equal(caches[3], caches[1])
    with pytest.raises(ValueError, match="one row"):
        int8_linear(torch.cat([x, x]), q, scale, rotary=RotaryWrite(cos, sin, caches[2], caches[3], slot))
    with pytest.raises(ValueError, match="not Q, K and V"):
        int8_linear(x, q[:-8], scale[:-8], rotary=RotaryWrite(cos, sin, caches[2], caches[3], slot))
    with pytest.raises(ValueError, match="cos must be"):
        int8_linear(x, q, scale, rotary=RotaryWrite(cos[:, :8], sin, caches[2], caches[3], slot))
    with pytest.raises(ValueError, match="slot_mapping"):
        int8_linear(x, q, scale, rotary=RotaryWrite(cos, sin, caches[2], caches[3], slot.float()))


@pytest.mark.parametrize(
    "config", [None, CONFIGS[0], CONFIGS[1], CONFIGS[3]], ids=["default", "plain", "split3-n32", "split2-n64"]
)
def test_gemv_adds_the_residual_and_norms_its_input_from_square_sums(
    config: Int8MatmulConfig | None, device: torch.device
) -> None:
    """residual: the bits of the product plus the residual (16-bit), and each 16 columns' square sums;
    norm: the product of RMSNorm's output from those sums, within the output's rounding of the
    float64 reference. int8 and 16-bit weights, split K, a width that is no multiple of 16."""
    hidden, out_features = 232, 72
    q, scale, _ = make_int8_linear(hidden, 200, None, device, seed=13)
    q_next, scale_next, _ = make_int8_linear(out_features, hidden, None, device, seed=14)
    weights_16bit = [(torch.randn(shape, device=device) * 0.05) for shape in ((hidden, 200), (out_features, hidden))]
    for dtype in kernel_dtypes(device):
        x = torch.randn(1, 200, device=device).to(dtype)
        residual = torch.randn(1, hidden, device=device).to(dtype)
        norm_weight = (1 + 0.1 * torch.randn(hidden, device=device)).to(dtype)
        # (the first product, the one after it, the latter's weight in float64)
        pairs = [
            (
                lambda x, **kw: int8_linear(x, q, scale, config=config, **kw),
                lambda x, **kw: int8_linear(x, q_next, scale_next, config=config, **kw),
                dequantize_int8(q_next, scale_next, torch.float64),
            )
        ]
        if dtype != torch.float32:
            first, second = (w.to(dtype) for w in weights_16bit)
            pairs.append(
                (
                    lambda x, **kw: gemv_16bit(x, first, config=config, **kw),
                    lambda x, **kw: gemv_16bit(x, second, config=config, **kw),
                    second.double(),
                )
            )
        for product, next_product, next_weight in pairs:
            square_sums = square_sums_buffer(residual)
            stream = product(x, residual=ResidualAdd(residual, square_sums))
            if dtype == torch.float32:  # the GPU may fuse the scale and the add (one rounding, not two)
                assert torch.allclose(stream, product(x) + residual, rtol=1e-6, atol=1e-6)
            else:
                assert torch.equal(stream, product(x) + residual)
            padded = F.pad(stream.double(), (0, 8))  # 232 columns: the last 16 hold 8
            expected_sums = padded.square().view(-1, 16).sum(-1)
            assert torch.allclose(square_sums.double(), expected_sums, rtol=1e-5, atol=0)
            out = next_product(stream, norm=NormInput(norm_weight, 1e-5, square_sums))
            s = stream.double()
            normed = s * torch.rsqrt(s.square().mean(-1, keepdim=True) + 1e-5) * norm_weight.double()
            assert relative_error(out, normed @ next_weight.T) < TOLERANCE[dtype], dtype
    with pytest.raises(ValueError, match="one row"):
        int8_linear(torch.cat([x, x]), q, scale, residual=ResidualAdd(torch.cat([residual] * 2), square_sums))
    with pytest.raises(ValueError, match="square_sums must be float32"):
        int8_linear(x, q, scale, residual=ResidualAdd(residual, square_sums[:-1]))
    with pytest.raises(ValueError, match="residual must be one contiguous row"):
        int8_linear(x, q, scale, residual=ResidualAdd(residual[:, :-1], square_sums))
    with pytest.raises(ValueError, match="norm weight must be one contiguous row"):
        int8_linear(stream, q_next, scale_next, norm=NormInput(norm_weight[:-1], 1e-5, square_sums))
    with pytest.raises(ValueError, match="multiple of 16"):
        config_8 = Int8MatmulConfig(block_m=1, block_n=8, block_k=32)
        int8_linear(x, q, scale, config=config_8, residual=ResidualAdd(residual, square_sums))


@pytest.mark.parametrize(("out_features", "in_features"), [(37, 200), (64, 256), (4096 + 48, 1000)])
@pytest.mark.parametrize("config", [None, CONFIGS[0], CONFIGS[1]], ids=["default", "plain", "split3"])
def test_gemv_16bit_matches_reference(
    out_features: int, in_features: int, config: Int8MatmulConfig | None, device: torch.device
) -> None:
    """The streaming GEMV on 16-bit weights: odd and tile-straddling shapes, split K, bias."""
    generator = torch.Generator().manual_seed(out_features)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.05
    bias = torch.randn(out_features, generator=generator)
    dtypes = [torch.bfloat16, torch.float16] if device.type == "cuda" else [torch.float16]
    for dtype in dtypes:
        w, b = weight.to(device, dtype), bias.to(device, dtype)
        for num_tokens in (1, 2):
            x = torch.randn(num_tokens, in_features, generator=generator).to(device, dtype)
            out = gemv_16bit(x, w, b, config=config)
            assert out.shape == (num_tokens, out_features) and out.dtype == dtype
            expected = x.double() @ w.double().T + b.double()
            assert relative_error(out, expected) < TOLERANCE[dtype], (dtype, num_tokens)
    with pytest.raises(ValueError, match="weight's dtype"):
        gemv_16bit(x.float(), w)
    with pytest.raises(ValueError, match="bf16 or fp16"):
        gemv_16bit(x.float(), w.float())


def test_gemv_16bit_of_silu_mul_input_is_the_two_kernels(device: torch.device) -> None:
    generator = torch.Generator().manual_seed(2)
    for dtype in [torch.bfloat16, torch.float16] if device.type == "cuda" else [torch.float16]:
        weight = (torch.randn(48, 232, generator=generator) * 0.05).to(device, dtype)
        gate_up = (3 * torch.randn(1, 464, generator=generator)).to(device, dtype)
        fused = gemv_16bit(gate_up, weight, silu_mul_input=True)
        assert torch.equal(fused, gemv_16bit(silu_mul(gate_up), weight))
        gate, up = gate_up.double().chunk(2, dim=-1)
        assert relative_error(fused, (F.silu(gate) * up) @ weight.double().T) < TOLERANCE[dtype]


def test_int8_linear_shapes_and_strides(device: torch.device) -> None:
    q, scale, _ = make_int8_linear(24, 64, None, device, seed=3)
    x = torch.randn(2, 3, 128, device=device)[..., ::2]  # [2, 3, 64], stride 2 along features
    out = int8_linear(x, q, scale)
    assert out.shape == (2, 3, 24)
    expected = int8_expected(x.reshape(-1, 64), q, scale, None, None).reshape(2, 3, 24)
    assert relative_error(out, expected) < TOLERANCE[torch.float32]
    assert int8_linear(x[:0], q, scale).shape == (0, 3, 24)
    bias = torch.randn(24, 2, device=device)[:, 0]  # stride 2
    expected = int8_expected(x.reshape(-1, 64), q, scale, bias, None).reshape(2, 3, 24)
    assert relative_error(int8_linear(x, q, scale, bias), expected) < TOLERANCE[torch.float32]


def test_int8_linear_rejects_bad_inputs(device: torch.device) -> None:
    q, scale, bias = make_int8_linear(16, 64, None, device, seed=0)
    x = torch.randn(2, 64, device=device)
    with pytest.raises(ValueError, match="last dimension"):
        int8_linear(x[:, :32], q, scale)
    with pytest.raises(ValueError, match="int8"):
        int8_linear(x, q.float(), scale)
    with pytest.raises(ValueError, match="weight_scale"):
        int8_linear(x, q, scale, group_size=32)
    with pytest.raises(ValueError, match="bias"):
        int8_linear(x, q, scale, bias[:8])
    with pytest.raises(ValueError, match="x.dtype"):
        int8_linear(x.double(), q, scale)


def test_default_config_fills_the_gpu() -> None:
    decode = default_config(1, 4096, 14336, None, num_sms=132)
    assert decode.block_m == 1
    assert decode.split_k * 4096 // decode.block_n >= 132
    assert math.ceil(14336 / decode.block_k) % decode.split_k == 0  # whole K blocks per split
    # Few rows and a long K: deep tiles, K split only where the tiles alone leave multiprocessors idle.
    for n, k in [(4096, 4096), (6144, 4096), (4096, 14336), (1024, 4096)]:
        config = default_config(1, n, k, None, num_sms=132)
        assert (config.block_n, config.block_k, config.prefetch) == (16, DEEP_GEMV_K, False)
        k_blocks = math.ceil(k / DEEP_GEMV_K)
        assert k_blocks % config.split_k == 0 and (config.split_k * n // 16 >= 132 or config.split_k == k_blocks)
    # Many rows (gate/up, an LM head) keep 512-deep tiles; so do short K and 16-bit weights.
    for n, k, weight_bytes in [(28672, 4096, 1), (128256, 4096, 1), (4096, 1024, 1), (4096, 4096, 2)]:
        assert default_config(1, n, k, None, num_sms=132, weight_bytes=weight_bytes).block_k == 512 // weight_bytes
    assert default_config(4096, 4096, 4096, None, num_sms=132).split_k == 1
    assert default_config(200, 4096, 4096, None, num_sms=132).split_k > 1
    assert 128 % default_config(16, 4096, 4096, 128, num_sms=132).block_k == 0
    grouped = default_config(1, 4096, 14336, 128, num_sms=132)  # a thread's sums take their group's scale
    assert grouped.block_k > 128 and grouped.split_k * 4096 // grouped.block_n >= 2 * 132
    # Between narrow tiles' two regimes, int8 rows of a short K take 64-row tiles, two programs a multiprocessor.
    wide = default_config(1, 6144, 1536, None, num_sms=132)
    assert (wide.block_n, wide.prefetch) == (64, False) and wide.split_k * 6144 // 64 >= 2 * 132
    assert default_config(1, 6144, 4096, None, num_sms=132, weight_bytes=2).block_n == 32


def expected_fp8_codes(values: torch.Tensor, scale: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The uint8 codes of ``clamp(values / scale, -448, 448)`` as the kernel's conversion makes them.

    On the GPU that is torch's conversion (round to nearest even), so these are the codes of
    ``formats.quantize_fp8_activation``. Triton 3.6's interpreter converts float32 to e4m3
    its own way (no carry into the exponent when rounding up, subnormals truncated); on the
    CPU the codes come from that same converter, so all but the conversion itself is checked.
    """
    scaled = (values.float() / scale).clamp(-FP8_MAX, FP8_MAX)
    if device.type == "cuda":
        return scaled.to(FP8_DTYPE).view(torch.uint8)
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    rounding = interpreter._ir.ROUNDING_MODE.RTNE
    codes = interpreter._convert_float(scaled.numpy(), tl.float32, tl.float8e4nv, rounding)
    return torch.from_numpy(codes.astype(np.uint8))


def assert_scales_match(scale: torch.Tensor, expected: torch.Tensor, device: torch.device) -> None:
    """Bit-equal on the GPU. The kernels multiply by float32(1 / 448) as torch does on CUDA;
    torch on the CPU divides, which may differ in the last bit."""
    if device.type == "cuda":
        assert torch.equal(scale, expected)
    else:
        torch.testing.assert_close(scale, expected, rtol=1.2e-7, atol=0)


def activation_rows(num_tokens: int, num_features: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Rows of very different magnitudes: some far beyond the 1200 bound, one all zero, one tiny."""
    generator = torch.Generator().manual_seed(num_tokens * 1000 + num_features)
    magnitude = 10.0 ** torch.empty(num_tokens, 1).uniform_(-2, 5, generator=generator)
    x = torch.randn(num_tokens, num_features, generator=generator) * magnitude
    if num_tokens > 2:
        x[1] = 0
        x[2] = x[2] * 1e-30 if dtype == torch.float32 else x[2] * 1e-4
    x[0, 0] = 5000.0  # beyond the bound, saturates
    return x.clamp(-6e4, 6e4).to(dtype).to(device)


@pytest.mark.parametrize(("num_tokens", "num_features"), [(1, 64), (3, 100), (17, 96), (4, 20000)])
@pytest.mark.parametrize("scale_ub", [1200.0, None])
def test_quantize_fp8_per_token_is_exact(
    num_tokens: int, num_features: int, scale_ub: float | None, device: torch.device
) -> None:
    for dtype in kernel_dtypes(device):
        x = activation_rows(num_tokens, num_features, dtype, device)
        q, scale = quantize_fp8_per_token(x, scale_ub)
        expected_q, expected_scale = quantize_fp8_activation(x, scale_ub)
        assert q.dtype == FP8_DTYPE and q.shape == (num_tokens, num_features)
        assert scale.shape == (num_tokens, 1)
        assert_scales_match(scale, expected_scale, device)
        assert torch.equal(q.view(torch.uint8), expected_fp8_codes(x, scale, device))
        if device.type == "cuda":
            assert torch.equal(q.view(torch.uint8), expected_q.view(torch.uint8))
        if num_tokens > 2:
            assert scale[1, 0].item() == pytest.approx(FP8_MIN_ACTIVATION_SCALE) and not q[1].float().any()
        if scale_ub is not None:
            assert scale.max().item() <= scale_ub / 448 * (1 + 1e-6)
            assert q[0, 0].float().item() == 448.0


@pytest.mark.parametrize(("num_tokens", "num_features"), [(1, 64), (3, 100), (17, 96), (4, 20000)])
def test_quantize_int8_per_token_is_exact(num_tokens: int, num_features: int, device: torch.device) -> None:
    for dtype in kernel_dtypes(device):
        x = activation_rows(num_tokens, num_features, dtype, device)
        q, scale = quantize_int8_per_token(x)
        expected_q, expected_scale = quantize_int8_activation(x)
        assert q.dtype == torch.int8 and q.shape == (num_tokens, num_features) and scale.shape == (num_tokens, 1)
        assert_scales_match(scale, expected_scale, device)
        # torch.round rounds half to even, as the kernel does: the same codes from the same scale.
        assert torch.equal(q, torch.round(x.float() / scale).clamp(-127, 127).to(torch.int8))
        if device.type == "cuda":
            assert torch.equal(q, expected_q)
        assert q.abs().amax(dim=1).eq(127).sum().item() >= num_tokens - (1 if num_tokens > 2 else 0)
        if num_tokens > 2:
            assert not q[1].any() and scale[1, 0].item() == torch.finfo(torch.float32).tiny


def test_quantize_int8_per_token_rounds_ties_to_even(device: torch.device) -> None:
    # amax 254 gives scale 2 exactly (254 * float32(1 / 127) == 2.0): these values fall on ties.
    x = torch.tensor([[254.0, 1.0, 3.0, 5.0, -1.0, -3.0, 2.9999998, 249.0]], device=device)
    q, scale = quantize_int8_per_token(x)
    assert scale.item() == 2.0
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, 1, 124]]


@pytest.mark.parametrize(("num_tokens", "intermediate"), [(1, 64), (5, 96), (3, 20000)])
def test_silu_mul_quantize_fp8_matches_unfused(num_tokens: int, intermediate: int, device: torch.device) -> None:
    for dtype in kernel_dtypes(device):
        gate = (torch.randn(num_tokens, intermediate) * 4).to(dtype).to(device)
        up = (torch.randn(num_tokens, intermediate) * 4).to(dtype).to(device)
        up[0, 3] = 3000.0  # beyond the bound
        q, scale = silu_mul_quantize_fp8(gate, up)
        hidden = F.silu(gate) * up
        _, expected_scale = quantize_fp8_activation(hidden)
        # exp may differ from torch's in the last bit, and so the absolute maximum.
        torch.testing.assert_close(scale, expected_scale, rtol=1e-6, atol=0)
        # exp may differ from torch's in the last bit: a code or two in a million may move a step.
        wrong = q.view(torch.uint8) != expected_fp8_codes(hidden, scale, device)
        assert wrong.float().mean().item() < 1e-4
        fused_q, fused_scale = silu_mul_quantize_fp8(torch.cat([gate, up], dim=-1), None)
        assert torch.equal(fused_q.view(torch.uint8), q.view(torch.uint8)) and torch.equal(fused_scale, scale)


@pytest.mark.parametrize("num_features", [96, 20000])  # one pass; two
def test_a_nan_in_a_row_makes_its_scale_nan(num_features: int, device: torch.device) -> None:
    """As in the reference, a NaN activation makes its row's scale, so its product, NaN, and
    leaves the other rows alone; without it the row would come out finite."""
    x = torch.randn(3, num_features, generator=torch.Generator().manual_seed(num_features)).to(device)
    x[1, 5] = float("nan")
    norm_weight = torch.ones(num_features, device=device)
    quantizations = {
        "fp8, bounded": lambda: quantize_fp8_per_token(x, 1200.0),
        "fp8": lambda: quantize_fp8_per_token(x, None),
        "int8": lambda: quantize_int8_per_token(x),
        "silu_mul fp8, bounded": lambda: silu_mul_quantize_fp8(x, x, 1200.0),
        "silu_mul int8": lambda: silu_mul_quantize_int8(x, x),
    }
    if num_features <= 8192:  # the fused norm holds a whole row
        quantizations["rms_norm fp8, bounded"] = lambda: rms_norm_quantize_fp8(x, None, norm_weight, 1e-5, 1200.0)[:2]
    for name, quantize in quantizations.items():
        _, scale = quantize()
        assert scale[1].isnan().all() and scale[[0, 2]].isfinite().all(), name
    q, scale, _ = make_int8_linear(16, num_features, None, device, seed=3)
    out = w8a8_linear(x, q, scale)
    assert out[1].isnan().all() and out[[0, 2]].isfinite().all()


@pytest.mark.parametrize("is_silu_mul", [True, False])
@pytest.mark.parametrize("out_dtype", [FP8_DTYPE, torch.int8])
def test_row_quantize_walks_give_the_same_bits(is_silu_mul: bool, out_dtype: torch.dtype, device: torch.device) -> None:
    """One pass, two passes, SwiGLU values made twice or staged between the passes, blocks
    loaded one ahead or not: one result."""
    from neuron_llm.backends.cuda.fp8 import RowQuantizeConfig, _launch_quantize_rows, default_row_config

    x = activation_rows(5, 300, torch.float16, device)
    up = (torch.randn(5, 300) * 4).half().to(device) if is_silu_mul else None
    ub = 1200.0 if out_dtype == FP8_DTYPE else None
    one_pass = _launch_quantize_rows(x, up, ub, out_dtype, RowQuantizeConfig(512, 1, 4))
    walks = [RowQuantizeConfig(64, 5, 2), RowQuantizeConfig(128, 3, 4, stage=is_silu_mul)]
    walks += [RowQuantizeConfig(64, 5, 2, prefetch=True), RowQuantizeConfig(128, 3, 4, is_silu_mul, prefetch=True)]
    for config in walks:
        q, scale = _launch_quantize_rows(x, up, ub, out_dtype, config)
        assert torch.equal(q.view(torch.uint8), one_pass[0].view(torch.uint8)), config
        assert torch.equal(scale, one_pass[1]), config
    with pytest.raises(ValueError, match="does not cover"):
        _launch_quantize_rows(x, up, ub, out_dtype, RowQuantizeConfig(64, 4, 2))
    for num_features in (100, 4096, 14336, 20000):
        config = default_row_config(num_features, is_silu_mul)
        assert config.block * config.num_blocks >= num_features
        assert config.stage == config.prefetch == (is_silu_mul and config.num_blocks > 1)


@pytest.mark.cuda
def test_staged_rows_dropped_from_l2_give_the_same_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many staged rows, none a whole number of 128-byte lines: dropping each row's L2 lines
    once read (``discard.global.L2``) never touches a row still to be read."""
    from neuron_llm.backends.cuda import fp8

    assert fp8._discards_l2(torch.device("cuda"))
    gate_up = (torch.randn(2048, 2 * 20000, device="cuda") * 4).bfloat16()
    for quantize in (silu_mul_quantize_fp8, silu_mul_quantize_int8):
        with monkeypatch.context() as patch:
            patch.setattr(fp8, "_discards_l2", lambda device: False)
            kept = quantize(gate_up)
        dropped = quantize(gate_up)
        assert torch.equal(dropped[0].view(torch.uint8), kept[0].view(torch.uint8))
        assert torch.equal(dropped[1], kept[1])


@pytest.mark.parametrize(("num_tokens", "intermediate"), [(1, 64), (5, 96), (3, 20000)])
def test_silu_mul_quantize_int8_matches_unfused(num_tokens: int, intermediate: int, device: torch.device) -> None:
    for dtype in kernel_dtypes(device):
        gate_up = (torch.randn(num_tokens, 2 * intermediate) * 4).to(dtype).to(device)
        q, scale = silu_mul_quantize_int8(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        _, expected_scale = quantize_int8_activation(F.silu(gate) * up)
        # exp may differ from torch's in the last bit, and so the absolute maximum.
        torch.testing.assert_close(scale, expected_scale, rtol=1e-6, atol=0)
        codes = torch.round((F.silu(gate) * up).float() / scale).clamp(-127, 127)
        steps = (q.float() - codes).abs()
        assert steps.max().item() <= 1 and (steps != 0).float().mean().item() < 1e-3
        separate_q, separate_scale = silu_mul_quantize_int8(gate.contiguous(), up.contiguous())
        assert torch.equal(separate_q, q) and torch.equal(separate_scale, scale)


@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("scale_ub", [1.0, None])
def test_rms_norm_quantize_fp8_matches_unfused(
    with_residual: bool, scale_ub: float | None, device: torch.device
) -> None:
    hidden = 96
    for dtype in kernel_dtypes(device):
        norm = RMSNorm(hidden, 1e-5).to(device=device, dtype=dtype).requires_grad_(False)
        norm.weight.data = torch.randn(hidden, device=device).to(dtype)
        x = torch.randn(7, hidden, device=device).to(dtype) * 30
        residual = torch.randn(7, hidden, device=device).to(dtype) if with_residual else None
        q, scale, new_residual = rms_norm_quantize_fp8(x, residual, norm.weight.data, 1e-5, scale_ub)
        summed = x if residual is None else x + residual
        _, expected_scale = quantize_fp8_activation(norm(summed), scale_ub)
        torch.testing.assert_close(scale, expected_scale, rtol=1e-5, atol=0)
        # The norm's float32 sum may round differently from torch's: allow a few codes one step apart.
        codes = expected_fp8_codes(norm(summed), scale, device)
        steps = (q.view(torch.uint8).short() - codes.short()).abs()
        assert (steps != 0).float().mean().item() < 0.02 and steps.max().item() <= 1
        if with_residual:
            assert torch.equal(new_residual, summed)
        else:
            assert new_residual is None


def test_fp8_scaled_mm_matches_reference(device: torch.device) -> None:
    """The matmul half of fp8_linear, fed the reference's quantized activations (torch runs it on the CPU too)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        pytest.skip("fp8 matmuls need sm_89 or newer")
    weight, weight_scale = quantize_fp8_weight(torch.randn(48, 64) * 0.02)
    weight, weight_scale = weight.to(device), weight_scale.to(device)
    bias = torch.randn(48, device=device)
    for dtype in kernel_dtypes(device):
        x = activation_rows(5, 64, dtype, device)
        x_q, x_scale = quantize_fp8_activation(x)
        out = fp8_scaled_mm(x_q, x_scale, weight, weight_scale, dtype, bias.to(dtype))
        expected = reference.fp8_linear(x, weight, weight_scale, bias.to(dtype))
        assert out.dtype == dtype and relative_error(out, expected) < FP8_MATMUL_TOLERANCE[dtype]


@pytest.mark.cuda
@pytest.mark.parametrize("num_tokens", [1, 3, 17, 130])
def test_fp8_linear_matches_reference(num_tokens: int, device: torch.device) -> None:
    if torch.cuda.get_device_capability(device) < (8, 9):
        pytest.skip("fp8 matmuls need sm_89 or newer")
    weight, weight_scale = quantize_fp8_weight(torch.randn(272, 512) * 0.02)
    weight, weight_scale = weight.to(device), weight_scale.to(device)
    bias = torch.randn(272, device=device)
    for dtype in kernel_dtypes(device):
        x = activation_rows(num_tokens, 512, dtype, device)
        for b in (None, bias.to(dtype)):
            out = fp8_linear(x, weight, weight_scale, b)
            expected = reference.fp8_linear(x, weight, weight_scale, b)
            assert out.shape == (num_tokens, 272) and out.dtype == dtype
            assert relative_error(out, expected) < FP8_MATMUL_TOLERANCE[dtype]
    out = fp8_linear(torch.randn(2, 3, 512, device=device, dtype=torch.bfloat16), weight, weight_scale)
    assert out.shape == (2, 3, 272)


@pytest.mark.parametrize("num_tokens", [1, 3, 17, 130])
@pytest.mark.parametrize("in_features", [512, 100])  # 100: not a multiple of 8, the reference runs it
def test_w8a8_linear_matches_reference(
    num_tokens: int, in_features: int, device: torch.device, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fewer than 17 rows are padded for torch._int_mm (which runs on the CPU too)."""
    if in_features % 8:

        def refuse(*args: object) -> torch.Tensor:
            raise AssertionError("torch._int_mm called with a width it does not take")

        monkeypatch.setattr(torch, "_int_mm", refuse)
    weight, weight_scale = quantize_int8(torch.randn(272, in_features) * 0.02)
    weight, weight_scale = weight.to(device), weight_scale.to(device)
    bias = torch.randn(272, device=device)
    for dtype in kernel_dtypes(device):
        x = activation_rows(num_tokens, in_features, dtype, device)
        # In float64 from the quantized operands, not through the reference the narrow widths run.
        x_q, x_scale = quantize_int8_activation(x)
        exact = (x_q.double() @ weight.double().T) * x_scale.double() * weight_scale.double().T
        for b in (None, bias.to(dtype)):
            out = w8a8_linear(x, weight, weight_scale, b)
            expected = exact if b is None else exact + b.double()
            assert out.shape == (num_tokens, 272) and out.dtype == dtype
            assert relative_error(out.double(), expected) < TOLERANCE[dtype]
    out = w8a8_linear(torch.randn(2, 3, in_features, device=device), weight, weight_scale)
    assert out.shape == (2, 3, 272)


@pytest.mark.parametrize("num_tokens", [1, 5, 16])  # the GEMV, 16-row tiles
@pytest.mark.parametrize(("out_features", "in_features"), [(48, 64), (37, 1000), (40, 2064)])  # 2064: deep tiles
def test_fp8_rows_matmul_is_w8a8(num_tokens: int, out_features: int, in_features: int, device: torch.device) -> None:
    """Few rows of fp8 W8A8 stream the weight: the products of the quantized operands, summed in
    float32 and scaled at the end, against float64 from the same operands."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        pytest.skip("fp8 matmuls need sm_89 or newer")
    weight, weight_scale = quantize_fp8_weight(torch.randn(out_features, in_features) * 0.02)
    weight, weight_scale = weight.to(device), weight_scale.to(device)
    bias = torch.randn(out_features, device=device)
    for dtype in kernel_dtypes(device):
        x_q, x_scale = quantize_fp8_activation(activation_rows(num_tokens, in_features, dtype, device))
        exact = (x_q.double() @ weight.double().T) * x_scale.double() * weight_scale.double().T
        for b in (None, bias.to(dtype)):
            out = fp8_rows_matmul(x_q, x_scale, weight, weight_scale, dtype, b)
            expected = exact if b is None else exact + b.double()
            assert out.shape == (num_tokens, out_features) and out.dtype == dtype
            assert relative_error(out.double(), expected) < TOLERANCE[dtype]


@pytest.mark.cuda
def test_fp8_scaled_mm_streams_the_weight_of_few_rows(device: torch.device, monkeypatch: pytest.MonkeyPatch) -> None:
    if torch.cuda.get_device_capability(device) < (8, 9):
        pytest.skip("fp8 matmuls need sm_89 or newer")
    weight, weight_scale = quantize_fp8_weight(torch.randn(48, 64) * 0.02)
    weight, weight_scale = weight.to(device), weight_scale.to(device)
    x_q, x_scale = quantize_fp8_activation(activation_rows(17, 64, torch.bfloat16, device))
    calls = []
    scaled_mm = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *args, **kwargs: calls.append(1) or scaled_mm(*args, **kwargs))
    fp8_scaled_mm(x_q[:16], x_scale[:16], weight, weight_scale, torch.bfloat16)
    assert not calls
    fp8_scaled_mm(x_q, x_scale, weight, weight_scale, torch.bfloat16)
    assert calls


def test_fp8_rows_matmul_rejects_bad_inputs(device: torch.device) -> None:
    weight, weight_scale = quantize_fp8_weight(torch.randn(48, 64))
    x_q, x_scale = quantize_fp8_activation(torch.randn(2, 64))
    with pytest.raises(ValueError, match="x_scale must be float32 \\[2, 1\\]"):
        fp8_rows_matmul(x_q, x_scale[:1], weight, weight_scale, torch.bfloat16)
    with pytest.raises(ValueError, match="2-D"):
        fp8_rows_matmul(x_q.float(), x_scale, weight, weight_scale, torch.bfloat16)
    with pytest.raises(ValueError, match="in_features=64"):
        fp8_rows_matmul(x_q[:, :32], x_scale, weight, weight_scale, torch.bfloat16)
    with pytest.raises(ValueError, match="out_dtype=torch.int32"):
        fp8_rows_matmul(x_q, x_scale, weight, weight_scale, torch.int32)


def test_fp8_linear_rejects_bad_inputs(device: torch.device) -> None:
    weight, weight_scale = quantize_fp8_weight(torch.randn(48, 64))
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="divisible by 16"):
        fp8_linear(x, weight[:40], weight_scale[:40])
    with pytest.raises(ValueError, match="weight_scale"):
        fp8_linear(x, weight, weight_scale[:, 0])
    with pytest.raises(ValueError, match="float8"):
        fp8_linear(x, weight.float(), weight_scale)
    with pytest.raises(ValueError, match="activation_scale_ub"):
        quantize_fp8_per_token(x, 0.0)
    with pytest.raises(ValueError, match="must match gate"):
        silu_mul_quantize_fp8(x, x[:, :32])


@pytest.mark.cuda
def test_int8_split_k_is_deterministic(device: torch.device) -> None:
    """The last split of each tile sums the partials in split order: repeated calls give the same bits."""
    q, scale, bias = make_int8_linear(4096, 4096, None, device, seed=13)
    x = torch.randn(3, 4096, device=device, dtype=torch.bfloat16)
    config = Int8MatmulConfig(block_m=1, block_n=16, block_k=128, split_k=8)
    first = int8_linear(x, q, scale, bias.bfloat16(), config=config)
    assert relative_error(first, int8_expected(x, q, scale, bias.bfloat16(), None)) < TOLERANCE[torch.bfloat16]
    for _ in range(50):
        assert torch.equal(int8_linear(x, q, scale, bias.bfloat16(), config=config), first)


def _needs_free_gpu_memory(gib: int) -> None:
    if torch.cuda.mem_get_info()[0] < gib << 30:
        pytest.skip(f"needs {gib} GiB of free GPU memory")


@pytest.mark.cuda
@pytest.mark.large_memory
@pytest.mark.parametrize("weight_dtype", [torch.int8, torch.bfloat16])
def test_gemv_of_a_weight_past_2_31_elements(weight_dtype: torch.dtype, device: torch.device) -> None:
    """Rows past element 2**31 of the weight (a 405B LM head holds 2.1e9) are read where they lie."""
    _needs_free_gpu_memory(12)
    out_features, in_features = 2**31 // 16384 + 64, 16384
    if weight_dtype == torch.int8:
        weight = torch.randint(-128, 128, (out_features, in_features), dtype=torch.int8, device=device)
    else:
        weight = torch.randn(out_features, in_features, dtype=torch.bfloat16, device=device)
    scale = torch.rand(out_features, 1, device=device) / 64
    x = torch.randn(1, in_features, device=device, dtype=torch.bfloat16)
    out = int8_linear(x, weight, scale) if weight_dtype == torch.int8 else gemv_16bit(x, weight)
    for rows in (slice(0, 64), slice(-128, None)):  # the last 64 rows lie past element 2**31
        expected = x.double() @ weight[rows].double().T
        if weight_dtype == torch.int8:
            expected = expected * scale[rows].double().T
        assert relative_error(out[:, rows], expected) < TOLERANCE[torch.bfloat16], rows


@pytest.mark.cuda
@pytest.mark.large_memory
@pytest.mark.parametrize("split_k", [1, 3])
def test_int8_matmul_of_rows_past_2_31_elements(split_k: int, device: torch.device) -> None:
    """Activation, output and split-K scratch offsets past 2**31 (a long prompt through a wide
    projection) are computed in 64 bits."""
    _needs_free_gpu_memory(32)
    # split_k 1: x and the output hold 2**31 + 4,096 elements. split_k 3 (96 inputs, three
    # splits of 32): the fp32 scratch [3, M, 64] does, its third split from element
    # 2**31 + 8,192, stored there and summed by the last split to finish.
    num_rows, in_features = (2**25 + 64, 64) if split_k == 1 else (2**24 + 64, 96)
    q, scale, bias = make_int8_linear(64, in_features, None, device, seed=5)
    x = torch.randn(num_rows, in_features, device=device, dtype=torch.bfloat16)
    config = Int8MatmulConfig(block_m=64, block_n=64, block_k=32, split_k=split_k)
    out = int8_linear(x, q, scale, bias.bfloat16(), config=config)
    for rows in (slice(0, 128), slice(-128, None)):
        expected = int8_expected(x[rows], q, scale, bias.bfloat16(), None)
        assert relative_error(out[rows], expected) < TOLERANCE[torch.bfloat16], rows


@pytest.mark.cuda
def test_linear_kernels_replay_in_a_cuda_graph(device: torch.device) -> None:
    """Decode (split K) and prefill int8 shapes, the fp8 linear and the fused quantization, captured once."""
    q, scale, bias = make_int8_linear(512, 1024, 128, device, seed=11)
    fp8_weight, fp8_scale = (t.to(device) for t in quantize_fp8_weight(torch.randn(256, 512)))
    decode_x = torch.randn(1, 1024, device=device, dtype=torch.bfloat16)
    prefill_x = torch.randn(300, 1024, device=device, dtype=torch.bfloat16)
    gate_up = torch.randn(16, 1024, device=device, dtype=torch.bfloat16)
    has_fp8 = torch.cuda.get_device_capability(device) >= (8, 9)

    def step() -> list[torch.Tensor]:
        outputs = [
            int8_linear(decode_x, q, scale, bias.bfloat16(), 128),
            int8_linear(prefill_x, q, scale, None, 128),
            *silu_mul_quantize_fp8(gate_up),
        ]
        if has_fp8:
            outputs.append(fp8_linear(prefill_x[:, :512], fp8_weight, fp8_scale))
        return outputs

    step()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    for tensor in (decode_x, prefill_x, gate_up):
        tensor.copy_(torch.randn_like(tensor))
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(outputs, step(), strict=True):
        if got.dtype == FP8_DTYPE:
            got, want = got.view(torch.uint8), want.view(torch.uint8)
        assert torch.equal(got, want)

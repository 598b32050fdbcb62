"""fp8 e4m3 (W8A8) linears: per-token activation quantization in Triton, the matmul in cuBLASLt.

The Llama 3 recipe (``neuron_llm.quant.formats``): weights are float8_e4m3fn [out, in] with
float32 per-channel scales [out, 1]; each token's activations are quantized at run time with
one float32 scale, ``clamp(min(absmax, ub) / 448, min=FP8_MIN_ACTIVATION_SCALE)``, values
beyond the bound saturating at +-448. The matmul is ``torch._scaled_mm`` with row-wise scales
(fp8 tensor cores, float32 accumulation, both scales applied in the epilogue); products of
at most ``STREAMED_MAX_ROWS`` rows (decode) go to the weight-streaming kernel of
``int8_matmul`` instead, 1.2-2x faster there: the same W8A8 products, summed in float32 in
another order (not cuBLAS's fast accumulation) and with the bias added before rounding.

The quantization kernels work one token (row) per program, in one pass over the row when it
fits in registers (``MAX_SINGLE_PASS_FEATURES``; otherwise a pass for the absolute maximum and
one to quantize, and SwiGLU values made in the first are stored and read back from cache in
the second). Besides plain quantization they fuse it with what precedes it in a Llama layer,
so the 16-bit activation that feeds an fp8 linear needs no kernel of its own:

- ``silu_mul_quantize_fp8``: ``silu(gate) * up``, the input of ``down_proj``;
- ``rms_norm_quantize_fp8``: the residual add and RMSNorm, the input of ``gate_proj``/``up_proj``.

The row kernel also writes int8 for the w8a8 linears (``quantize_int8_per_token``, bit for
bit ``formats.quantize_int8_activation`` on the GPU): scale ``max(amax * float32(1 / 127),
tiny)``, then ``x / scale`` rounded half to even by the float32 add-and-subtract of 1.5 * 2^23.

Both round where the unfused model rounds (to the activation dtype after silu, after the
product, after the norm), so they quantize the same values the unfused path would; the
kernels are compiled without multiply-add fusion so that every rounding stays where torch has
it. ``quantize_fp8_per_token`` gives the bits of ``formats.quantize_fp8_activation`` run on
the GPU: the scale is ``amax * float32(1 / 448)`` (torch on CUDA divides by a Python number
that way; on the CPU it divides, which can differ in the last bit) and ``x / scale`` is
correctly rounded, as torch's tensor division is: for 16-bit activations a product with the
row's inverse and one fma correction (``_divide``), otherwise ``div_rn``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from neuron_llm.backends.cuda import int8_matmul, launch
from neuron_llm.backends.cuda.fused import _check_norm_inputs, _load_residual_sum, _rms_norm_row, silu_mul_rounded
from neuron_llm.quant.formats import (
    DEFAULT_ACTIVATION_SCALE_UB,
    FP8_DTYPE,
    FP8_MAX,
    FP8_MIN_ACTIVATION_SCALE,
    INT8_MAX,
)

MAX_SINGLE_PASS_FEATURES = 4096
"""Longest row quantized from registers in one pass; longer rows are read twice, in blocks of
``_BLOCK_TWO_PASS`` with 8 warps. A whole row of 14336 in registers holds one program a
multiprocessor: on an H200, SwiGLU and fp8 of 4096 such rows ran 250 us in one pass, 131 us
in two with the values staged, 120 us with the staged values then dropped from L2 unwritten,
then 98 us dividing by the row's inverse and loading a block ahead (BENCHMARKS.md)."""
_BLOCK_TWO_PASS = 2048


@dataclass(frozen=True)
class RowQuantizeConfig:
    """How the row kernel walks a row: ``num_blocks`` blocks of ``block`` features."""

    block: int
    num_blocks: int
    num_warps: int
    stage: bool = False
    """Two passes of SwiGLU values: store them in the first, read them back in the second."""
    prefetch: bool = False
    """In the first of two passes, load each block while the one before is computed."""


def default_row_config(num_features: int, is_silu_mul: bool) -> RowQuantizeConfig:
    if num_features <= MAX_SINGLE_PASS_FEATURES:
        block = triton.next_power_of_2(num_features)
        return RowQuantizeConfig(block, 1, max(1, min(16, block // 512)))
    # SwiGLU values are worth keeping between the passes: computing them is the kernel's main
    # cost, and loading a block ahead keeps memory busy meanwhile.
    num_blocks = triton.cdiv(num_features, _BLOCK_TWO_PASS)
    return RowQuantizeConfig(_BLOCK_TWO_PASS, num_blocks, 8, stage=is_silu_mul, prefetch=is_silu_mul)


STREAMED_MAX_ROWS = 16
"""Most rows whose fp8 product streams the weight (``int8_matmul.fp8_rows_matmul``). On an
H200, ``_scaled_mm`` took 16-41 us for Llama-3-8B's linears at 1-64 rows, at 25-37% of the
copy bandwidth except gate/up (BENCHMARKS.md)."""
_SCALED_MM_ALIGNMENT = 16
"""``torch._scaled_mm`` needs in_features and out_features divisible by 16 (M is free)."""

_TRITON_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}

_FP8_MAX = tl.constexpr(FP8_MAX)
_INV_FP8_MAX = tl.constexpr(1.0 / FP8_MAX)
_MIN_SCALE = tl.constexpr(FP8_MIN_ACTIVATION_SCALE)
_INT8_MAX = tl.constexpr(float(INT8_MAX))
_INV_INT8_MAX = tl.constexpr(1.0 / INT8_MAX)
_MIN_INT8_SCALE = tl.constexpr(torch.finfo(torch.float32).tiny)
_ROUNDING_SHIFT = tl.constexpr(1.5 * 2.0**23)
"""Adding then subtracting it rounds a float32 of magnitude below 2^22 to an integer, half to even."""
_MAX_QUOTIENT = tl.constexpr(2.0**100)
_MIN_DIVISOR = tl.constexpr(2.0**-100)


# A NaN in a row makes its scale NaN, so the row's product is NaN, as the reference's is:
# Triton's max and min otherwise drop NaN, and a broken activation would come out finite.
_NAN = tl.constexpr(tl.PropagateNan.ALL)


@triton.jit
def _nan_max(a, b):
    return tl.maximum(a, b, propagate_nan=_NAN)


@triton.jit
def _abs_max(values):
    """The absolute maximum of a block of a row; NaN if it holds one."""
    return tl.reduce(tl.abs(values), 0, _nan_max)


@triton.jit
def _token_scale(amax, scale_ub, HAS_UB: tl.constexpr):
    """The float32 scale of a token whose absolute maximum is ``amax``."""
    if HAS_UB:
        amax = tl.minimum(amax, scale_ub, propagate_nan=_NAN)
    return tl.maximum(amax * _INV_FP8_MAX, _MIN_SCALE, propagate_nan=_NAN)


# Both branches return from an if/else: Triton compiles a trailing return after an if as a
# second return path, and refuses the int8 and fp8 paths' different types.
@triton.jit
def _row_scale(amax, scale_ub, HAS_UB: tl.constexpr, IS_INT8: tl.constexpr):
    if IS_INT8:
        return tl.maximum(amax * _INV_INT8_MAX, _MIN_INT8_SCALE, propagate_nan=_NAN)
    else:
        return _token_scale(amax, scale_ub, HAS_UB)


@triton.jit
def _divides_by_inverse(amax, scale, inverse):
    """Whether ``_divide`` may use ``inverse`` for a row: its values finite (``amax`` is
    their absolute maximum before any bound), no quotient near overflow, and a scale large
    enough that a remainder below the normal range (where the correction is inexact) comes
    only from a value below 2^-102, whose code is zero either way."""
    return (amax * inverse < _MAX_QUOTIENT) & (scale >= _MIN_DIVISOR)


@triton.jit
def _divide(values, scale, inverse, BY_INVERSE: tl.constexpr):
    """``values / scale`` correctly rounded, as torch divides.

    With BY_INVERSE (``inverse`` the correctly rounded ``1 / scale``, values 16-bit numbers,
    the row passing ``_divides_by_inverse``) a product and one Markstein correction give the
    bits of the division in four instructions instead of about ten: the remainder
    ``quotient * scale - values`` is exact in an fma, and ``quotient - remainder * inverse``
    rounds to the correctly rounded quotient. (``-values`` is ``0 - values`` in Triton, not
    a negation; the signs are chosen so that a -0 value still gives -0.)
    ``tests/cuda/test_fp8_divide.py`` checks every fp16 significand (bf16's among them)
    against every float32 one.
    """
    if BY_INVERSE:
        quotient = values * inverse
        remainder = tl.fma(quotient, scale, -values)
        return tl.fma(remainder, -inverse, quotient)
    else:
        return tl.math.div_rn(values, scale)


@triton.jit
def _divide_in_row(values, amax, scale, inverse, BY_INVERSE: tl.constexpr):
    """``_divide`` for a block of a row, by the row's ``inverse`` where ``_divides_by_inverse``
    allows it (a branch the whole program takes one way)."""
    # The branch yields float32: yielding the fp8 codes instead, about one code in eight came
    # out wrong (Triton 3.6 on an H200; int8 codes were right).
    if BY_INVERSE:
        if _divides_by_inverse(amax, scale, inverse):
            scaled = _divide(values, scale, inverse, True)
        else:
            scaled = _divide(values, scale, inverse, False)
    else:
        scaled = _divide(values, scale, inverse, False)
    return scaled


@triton.jit
def _codes(scaled, IS_INT8: tl.constexpr):
    """The int8 (rounded half to even) or fp8 codes of quotients ``scaled``, saturated."""
    if IS_INT8:
        scaled = tl.clamp(scaled, -_INT8_MAX, _INT8_MAX)
        return ((scaled + _ROUNDING_SHIFT) - _ROUNDING_SHIFT).to(tl.int8)
    else:
        return tl.clamp(scaled, -_FP8_MAX, _FP8_MAX).to(tl.float8e4nv)


@triton.jit
def _quantize(values, amax, scale, inverse, IS_INT8: tl.constexpr, BY_INVERSE: tl.constexpr):
    """The codes of a block of a row of absolute maximum ``amax`` and scale ``scale``."""
    return _codes(_divide_in_row(values, amax, scale, inverse, BY_INVERSE), IS_INT8)


@triton.jit
def _load_block(x_ptr, up_ptr, offs, mask, IS_SILU_MUL: tl.constexpr):
    """A block of x (the gate with IS_SILU_MUL) and of up (x again without)."""
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    up = x
    if IS_SILU_MUL:
        up = tl.load(up_ptr + offs, mask=mask, other=0.0)
    return x, up


@triton.jit
def _block_values(x, up, IS_SILU_MUL: tl.constexpr):
    """The float32 values to quantize: ``silu(x) * up`` rounded as torch rounds it, or x."""
    if IS_SILU_MUL:
        return silu_mul_rounded(x, up).to(tl.float32)
    else:
        return x.to(tl.float32)


@triton.jit
def _row_values(x_ptr, up_ptr, offs, mask, IS_SILU_MUL: tl.constexpr):
    x, up = _load_block(x_ptr, up_ptr, offs, mask, IS_SILU_MUL)
    return _block_values(x, up, IS_SILU_MUL)


@triton.jit
def _discard_l2_lines(ptr, num_bytes, LINES: tl.constexpr):
    """Drop the 128-byte L2 lines of ``[ptr, ptr + num_bytes)`` (``ptr`` 128-byte aligned, the
    last line ours whole) without writing them back: their contents become undefined."""
    line = tl.minimum(tl.arange(0, LINES), tl.cdiv(num_bytes, 128) - 1)
    addresses = ptr.to(tl.pointer_type(tl.int8)) + line * 128
    tl.inline_asm_elementwise(
        "discard.global.L2 [$1], 128;\n\tmov.u32 $0, 0;", "=r,l", [addresses], dtype=tl.int32, is_pure=False, pack=1
    )


@triton.jit
def _quantize_rows_kernel(
    x_ptr,
    up_ptr,
    q_ptr,
    scale_ptr,
    staged_ptr,
    num_features,
    stride_x,
    stride_up,
    stride_q,
    stride_staged,
    scale_ub,
    HAS_UB: tl.constexpr,
    IS_SILU_MUL: tl.constexpr,
    IS_INT8: tl.constexpr,
    BLOCK: tl.constexpr,
    NUM_BLOCKS: tl.constexpr,
    STAGE: tl.constexpr,
    DISCARD_STAGED: tl.constexpr,
    STAGED_LINES: tl.constexpr,
    BY_INVERSE: tl.constexpr,
    PREFETCH: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """q[row] = fp8 (int8) of values[row] / scale[row]; values are x, or silu(x) * up with IS_SILU_MUL.

    A row longer than one block is read twice: once for its absolute maximum, once to
    quantize. With STAGE the first pass stores the values (in x's dtype, which holds them
    exactly) at ``staged_ptr`` and the second reads them back from cache instead of computing
    silu(x) * up again; with DISCARD_STAGED their lines then leave L2 unwritten (rows of
    ``STAGED_LINES`` or fewer 128-byte lines, each row's start aligned to one). BY_INVERSE
    (values that are 16-bit numbers) divides as ``_divide`` says.
    """
    launch.wait_for_inputs(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    up_row = up_ptr + row * stride_up
    q_row = q_ptr + row * stride_q
    offs = tl.arange(0, BLOCK)
    if NUM_BLOCKS == 1:
        mask = offs < num_features
        values = _row_values(x_row, up_row, offs, mask, IS_SILU_MUL)
        amax = _abs_max(values)
        scale = _row_scale(amax, scale_ub, HAS_UB, IS_INT8)
        inverse = tl.math.div_rn(1.0, scale)
        tl.store(q_row + offs, _quantize(values, amax, scale, inverse, IS_INT8, BY_INVERSE), mask=mask)
    else:
        staged_row = staged_ptr + row * stride_staged
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        if PREFETCH:
            x_next, up_next = _load_block(x_row, up_row, offs, offs < num_features, IS_SILU_MUL)
        for block in range(NUM_BLOCKS):
            mask = block * BLOCK + offs < num_features
            if PREFETCH:
                # The next block's loads go out before this block's SwiGLU: twice the bytes in flight.
                x_block, up_block = x_next, up_next
                following = (block + 1) * BLOCK
                x_next, up_next = _load_block(
                    x_row + following, up_row + following, offs, following + offs < num_features, IS_SILU_MUL
                )
                values = _block_values(x_block, up_block, IS_SILU_MUL)
            else:
                values = _row_values(x_row + block * BLOCK, up_row + block * BLOCK, offs, mask, IS_SILU_MUL)
            if STAGE:
                tl.store(staged_row + block * BLOCK + offs, values.to(staged_ptr.dtype.element_ty), mask=mask)
            amax = tl.maximum(amax, tl.abs(values), propagate_nan=_NAN)
        amax = tl.reduce(amax, 0, _nan_max)
        scale = _row_scale(amax, scale_ub, HAS_UB, IS_INT8)
        inverse = tl.math.div_rn(1.0, scale)
        for block in range(NUM_BLOCKS):
            mask = block * BLOCK + offs < num_features
            if STAGE:
                values = tl.load(staged_row + block * BLOCK + offs, mask=mask, other=0.0).to(tl.float32)
            else:
                values = _row_values(x_row + block * BLOCK, up_row + block * BLOCK, offs, mask, IS_SILU_MUL)
            q = _quantize(values, amax, scale, inverse, IS_INT8, BY_INVERSE)
            tl.store(q_row + block * BLOCK + offs, q, mask=mask)
        if STAGE and DISCARD_STAGED:
            # Every thread has stored what it read of the staged row, so its reads are done;
            # past the barrier the row is dead, and writing it back to memory would cost as
            # much as reading the gate again.
            tl.debug_barrier()
            row_bytes = num_features * (staged_ptr.dtype.element_ty.primitive_bitwidth // 8)
            _discard_l2_lines(staged_row, row_bytes, STAGED_LINES)
    tl.store(scale_ptr + row, scale)


@triton.jit
def _rms_norm_quantize_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    q_ptr,
    scale_ptr,
    new_residual_ptr,
    num_features,
    stride_x,
    stride_residual,
    stride_q,
    stride_new_residual,
    eps,
    scale_ub,
    HAS_RESIDUAL: tl.constexpr,
    HAS_UB: tl.constexpr,
    NORM_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    BY_INVERSE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < num_features
    x = _load_residual_sum(
        x_ptr + row * stride_x,
        residual_ptr + row * stride_residual,
        new_residual_ptr + row * stride_new_residual,
        offs,
        mask,
        HAS_RESIDUAL,
    )
    weight = tl.load(weight_ptr + offs, mask=mask, other=0.0)
    normed = _rms_norm_row(x, weight, num_features, eps, NORM_DTYPE).to(tl.float32)
    amax = _abs_max(normed)
    scale = _token_scale(amax, scale_ub, HAS_UB)
    inverse = tl.math.div_rn(1.0, scale)
    q = _quantize(normed, amax, scale, inverse, False, BY_INVERSE)
    tl.store(q_ptr + row * stride_q + offs, q, mask=mask)
    tl.store(scale_ptr + row, scale)


def _check_scale_ub(activation_scale_ub: float | None) -> None:
    if activation_scale_ub is not None and not activation_scale_ub > 0:
        raise ValueError(f"activation_scale_ub={activation_scale_ub!r}: must be > 0 or None")


def _rows(x: torch.Tensor, name: str) -> torch.Tensor:
    """``x`` [..., features] as [tokens, features] with unit stride along features."""
    if x.dim() == 0 or not x.is_floating_point() or x.dtype == FP8_DTYPE:
        raise ValueError(f"{name} must be a 16/32-bit float tensor [..., features], got {x.dtype} {tuple(x.shape)}")
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _launch_quantize_rows(
    x: torch.Tensor,
    up: torch.Tensor | None,
    activation_scale_ub: float | None,
    out_dtype: torch.dtype = FP8_DTYPE,
    config: RowQuantizeConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The row kernel over ``x`` [tokens, features] (with ``up``: SwiGLU of x and up); ``config``
    overrides ``default_row_config`` (benchmarks sweep it)."""
    num_tokens, num_features = x.shape
    q = torch.empty(num_tokens, num_features, dtype=out_dtype, device=x.device)  # [tokens, features]
    scale = torch.empty(num_tokens, 1, dtype=torch.float32, device=x.device)  # [tokens, 1]
    if num_tokens == 0:
        return q, scale
    config = config or default_row_config(num_features, up is not None)
    if config.block * config.num_blocks < num_features or (config.stage and up is None):
        raise ValueError(f"{config} does not cover a row of {num_features} SwiGLU={up is not None} features")
    stage = config.stage and config.num_blocks > 1
    # Rows of whole 128-byte lines, so that a row's lines can be discarded from L2 (torch's
    # CUDA allocator aligns every block to 512 bytes).
    row_lines = triton.cdiv(num_features * x.element_size(), 128)
    staged = x
    if stage:
        staged = torch.empty(num_tokens, row_lines * 128 // x.element_size(), dtype=x.dtype, device=x.device)
    _quantize_rows_kernel[(num_tokens,)](
        x,
        up if up is not None else x,
        q,
        scale,
        staged,
        num_features,
        x.stride(0),
        up.stride(0) if up is not None else 0,
        q.stride(0),
        staged.stride(0),
        activation_scale_ub if activation_scale_ub is not None else 0.0,
        HAS_UB=activation_scale_ub is not None,
        IS_SILU_MUL=up is not None,
        IS_INT8=out_dtype == torch.int8,
        BLOCK=config.block,
        NUM_BLOCKS=config.num_blocks,
        STAGE=stage,
        DISCARD_STAGED=stage and _discards_l2(x.device),
        STAGED_LINES=triton.next_power_of_2(row_lines),
        BY_INVERSE=_divides_by_inverse_for(x.dtype),
        PREFETCH=config.prefetch,
        **launch.pdl(x.device),
        num_warps=config.num_warps,
        enable_fp_fusion=False,
    )
    return q, scale


def _divides_by_inverse_for(values_dtype: torch.dtype) -> bool:
    """Whether the kernels quantize by the row's inverse (``_divide``): for 16-bit values,
    the ones checked exhaustively, and not in Triton's interpreter, whose fma rounds twice."""
    return values_dtype in (torch.bfloat16, torch.float16) and not triton.knobs.runtime.interpret


@functools.cache
def _discards_l2(device: torch.device) -> bool:
    """Whether kernels on ``device`` may use ``discard.global.L2`` (PTX, sm_80+)."""
    if device.type != "cuda" or triton.knobs.runtime.interpret:
        return False
    return torch.cuda.get_device_capability(device)[0] >= 8


def quantize_fp8_per_token(
    x: torch.Tensor, activation_scale_ub: float | None = DEFAULT_ACTIVATION_SCALE_UB
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token fp8 quantization, bit for bit ``formats.quantize_fp8_activation``.

    ``x`` is [..., features] (16/32-bit float); each token's absolute maximum is bounded by
    ``activation_scale_ub`` (None: unbounded). Returns ``(q, scale)``: ``q`` float8_e4m3fn
    [tokens, features] and ``scale`` float32 [tokens, 1], tokens being the leading dims flattened.
    """
    _check_scale_ub(activation_scale_ub)
    return _launch_quantize_rows(_rows(x, "x"), None, activation_scale_ub)


def quantize_int8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token int8 quantization, bit for bit ``formats.quantize_int8_activation`` on the GPU.

    ``x`` is [..., features] (16/32-bit float). Returns ``(q, scale)``: ``q`` int8 [tokens,
    features] in [-127, 127] and ``scale`` float32 [tokens, 1].
    """
    return _launch_quantize_rows(_rows(x, "x"), None, None, torch.int8)


def silu_mul_quantize_fp8(
    gate_up_or_gate: torch.Tensor,
    up: torch.Tensor | None = None,
    activation_scale_ub: float | None = DEFAULT_ACTIVATION_SCALE_UB,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_fp8_per_token(silu(gate) * up)`` in one pass, the fp8 input of ``down_proj``.

    Either ``gate_up_or_gate`` is [..., 2 * intermediate] holding gate then up (a fused
    gate/up projection) and ``up`` is None, or it is the gate [..., intermediate] and ``up``
    has its shape and dtype. silu and the product are rounded to the input dtype, as
    ``F.silu(gate) * up`` would be. Returns ``(q, scale)`` as ``quantize_fp8_per_token``.
    """
    _check_scale_ub(activation_scale_ub)
    return _launch_quantize_rows(*_gate_and_up_rows(gate_up_or_gate, up), activation_scale_ub)


def silu_mul_quantize_int8(
    gate_up_or_gate: torch.Tensor, up: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_int8_per_token(silu(gate) * up)`` in one pass, the int8 input of a w8a8 ``down_proj``.

    Takes gate and up as ``silu_mul_quantize_fp8`` does; returns ``(q, scale)`` as
    ``quantize_int8_per_token``.
    """
    return _launch_quantize_rows(*_gate_and_up_rows(gate_up_or_gate, up), None, torch.int8)


def _gate_and_up_rows(gate_up_or_gate: torch.Tensor, up: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate and up as [tokens, intermediate] rows: halves of a fused gate/up, or two tensors."""
    if up is None:
        if gate_up_or_gate.shape[-1] % 2:
            raise ValueError(f"gate_up.shape={tuple(gate_up_or_gate.shape)}: the last dimension must be even")
        gate, up_rows = _rows(gate_up_or_gate, "gate_up").chunk(2, dim=-1)  # [tokens, intermediate] each
        return gate, up_rows
    if up.shape != gate_up_or_gate.shape or up.dtype != gate_up_or_gate.dtype:
        raise ValueError(
            f"up ({up.dtype} {tuple(up.shape)}) must match gate "
            f"({gate_up_or_gate.dtype} {tuple(gate_up_or_gate.shape)})"
        )
    if up.device != gate_up_or_gate.device:
        raise ValueError(f"gate on {gate_up_or_gate.device} and up on {up.device}: must share a device")
    return _rows(gate_up_or_gate, "gate"), _rows(up, "up")


def rms_norm_quantize_fp8(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    activation_scale_ub: float | None = DEFAULT_ACTIVATION_SCALE_UB,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The residual add, RMSNorm and per-token fp8 quantization of ``x`` [..., hidden], in one pass.

    With ``residual`` (same shape and dtype as ``x``) the norm is of ``x + residual``, which is
    also returned; the normed values are rounded to the dtype ``fused.rms_norm`` returns
    before they are quantized. Returns ``(q, scale, new_residual)``: ``q`` float8_e4m3fn
    [tokens, hidden], ``scale`` float32 [tokens, 1], ``new_residual`` [..., hidden] or None.
    """
    _check_scale_ub(activation_scale_ub)
    _check_norm_inputs(x, weight, residual)
    x2 = _rows(x, "x")  # [tokens, hidden]
    num_tokens, hidden = x2.shape
    residual2 = None if residual is None else _rows(residual, "residual")
    new_residual = None if residual is None else torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    q = torch.empty(num_tokens, hidden, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(num_tokens, 1, dtype=torch.float32, device=x.device)
    if num_tokens > 0:
        block = triton.next_power_of_2(hidden)
        norm_dtype = torch.promote_types(x.dtype, weight.dtype)
        _rms_norm_quantize_kernel[(num_tokens,)](
            x2,
            residual2 if residual2 is not None else x2,
            weight.contiguous(),
            q,
            scale,
            new_residual if new_residual is not None else x2,
            hidden,
            x2.stride(0),
            residual2.stride(0) if residual2 is not None else 0,
            q.stride(0),
            new_residual.stride(0) if new_residual is not None else 0,
            eps,
            activation_scale_ub if activation_scale_ub is not None else 0.0,
            HAS_RESIDUAL=residual is not None,
            HAS_UB=activation_scale_ub is not None,
            NORM_DTYPE=_TRITON_DTYPES[norm_dtype],
            BLOCK=block,
            BY_INVERSE=_divides_by_inverse_for(norm_dtype),
            num_warps=max(1, min(16, block // 512)),
            enable_fp_fusion=False,
        )
    return q, scale, None if new_residual is None else new_residual.reshape(x.shape)


def _check_fp8_linear_inputs(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
) -> None:
    if weight.dtype != FP8_DTYPE or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D {FP8_DTYPE} tensor [out, in], got {weight.dtype} {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"x.shape={tuple(x.shape)}: the last dimension must be in_features={in_features}")
    _check_alignment(weight)
    if weight_scale.dtype != torch.float32 or tuple(weight_scale.shape) != (out_features, 1):
        raise ValueError(
            f"weight_scale must be float32 [{out_features}, 1], got {weight_scale.dtype} {tuple(weight_scale.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias.shape={tuple(bias.shape)}: must be [{out_features}]")
    tensors = [x, weight, weight_scale] + ([] if bias is None else [bias])
    if any(t.device != x.device for t in tensors):
        raise ValueError(f"all tensors must be on one device, got {[str(t.device) for t in tensors]}")


def _check_alignment(weight: torch.Tensor) -> None:
    if weight.shape[0] % _SCALED_MM_ALIGNMENT or weight.shape[1] % _SCALED_MM_ALIGNMENT:
        raise ValueError(
            f"weight.shape={tuple(weight.shape)}: torch._scaled_mm needs both dimensions divisible by "
            f"{_SCALED_MM_ALIGNMENT}; keep this linear in 16-bit or int8"
        )


def fp8_scaled_mm(
    x_fp8: torch.Tensor,
    x_scale: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(x_fp8 * x_scale) @ (weight * weight_scale).T + bias`` for activations already quantized.

    ``x_fp8`` float8_e4m3fn [tokens, in] with ``x_scale`` float32 [tokens, 1] (e.g. from
    ``silu_mul_quantize_fp8``); ``weight`` [out, in] and ``weight_scale`` [out, 1] as in
    ``fp8_linear``. Returns [tokens, out] in ``out_dtype``.
    """
    # Checked here, not only in fp8_linear, for the fused paths' sake; and at any row count: the
    # rows streamed below would run, and a prefill's _scaled_mm then fail.
    _check_alignment(weight)
    if x_fp8.is_cuda and x_fp8.shape[0] <= STREAMED_MAX_ROWS:
        return int8_matmul.fp8_rows_matmul(x_fp8, x_scale, weight, weight_scale, out_dtype, bias)
    # Row-wise scaling takes A row-major and B column-major: weight.t() of the row-major
    # [out, in] weight is exactly that, with no copy. scale_b is [1, out].
    out = torch._scaled_mm(
        x_fp8,
        weight.t(),
        scale_a=x_scale,
        scale_b=weight_scale.t(),
        out_dtype=out_dtype,
        use_fast_accum=True,
    )
    if bias is not None:
        out = out + bias.to(out_dtype)
    return out


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation_scale_ub: float | None = DEFAULT_ACTIVATION_SCALE_UB,
) -> torch.Tensor:
    """``x @ weight.T`` with both operands in fp8, as ``quant.reference.fp8_linear`` computes it.

    ``x`` [..., in] (bf16, fp16 or fp32) is quantized per token (``quantize_fp8_per_token``);
    ``weight`` float8_e4m3fn [out, in] with float32 ``weight_scale`` [out, 1]; in and out must
    be multiples of 16. Returns [..., out] in ``x.dtype``.
    """
    _check_fp8_linear_inputs(x, weight, weight_scale, bias)
    _check_scale_ub(activation_scale_ub)
    out_features = weight.shape[0]
    x_fp8, x_scale = _launch_quantize_rows(_rows(x, "x"), None, activation_scale_ub)
    out = fp8_scaled_mm(x_fp8, x_scale, weight, weight_scale, x.dtype, bias)
    return out.reshape(*x.shape[:-1], out_features)

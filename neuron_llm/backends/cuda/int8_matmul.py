"""int8 weight-only (W8A16) matmul in Triton: int8 bytes cross memory, dequantized in registers.

``out = x @ (q * scale).T + bias`` for ``x`` [..., in] in bf16/fp16/fp32, ``q`` int8 [out, in]
and float32 scales [out, 1] (per channel) or [out, ceil(in / group_size)] (per group), the
formats of ``neuron_llm.quant.formats``. One kernel covers every number of rows M:

- M = 1 (decode, one sequence): a GEMV. Each program owns ``block_n`` output columns and a
  range of K; it streams its int8 weight tile by tile, multiplies by x in float32 on the
  CUDA cores, sums each thread's products and reduces over K once at the end. The weight is
  read once in all, so the time is the weight's bytes over memory bandwidth, as long as the
  instructions per weight byte stay few: each int8 becomes a float32 by a byte permute and
  a subtract (``Int8MatmulConfig.convert``): the conversion instruction gives 16 results a
  clock per multiprocessor, an eighth of the float32 multiply-add rate and on the H200 about
  the rate at which memory delivers int8 weights.
- M > 1: a tiled ``tl.dot`` matmul whose B tile (the weight, [block_k, block_n]) is loaded
  as int8 and converted to the activation dtype in registers. Exact: int8 values fit any
  16-bit float. For small M (decode batches) it is still weight-streaming, with
  ``block_m`` = 16 (the smallest dot).

When the output tiles alone are too few to fill the GPU (few columns, small M), K is split
across ``split_k`` programs per tile. Each writes its float32 partial sums to a scratch
buffer, and the last to finish adds them up in split order (``launch.split_counters``).

Decode launches use programmatic dependent launch (``launch.py``): a GEMV program loads its
first weight tile before it waits for the kernel before. With ``silu_mul_input`` the kernel
computes the down projection's input, silu(gate) * up, as it loads it; with
``silu_mul_output`` the GEMV of the merged gate/up projection stores it instead (each tile
holds gate rows and the up rows of the same columns); with ``rotary`` the GEMV of the merged
Q/K/V projection rotates Q and K by RoPE and writes K and V to the KV cache as it stores
(each tile holds the rows RoPE pairs). ``gemv_16bit`` runs the same GEMV on
bf16/fp16 weights (no scales), for the single rows of a batch-1 decode; ``fp8_rows_matmul``
the GEMV and the 16-row tiles on fp8 weights and fp8 activations with per-row scales (the fp8
format's few-row products, whose weights cuBLAS's fp8 GEMM reads at 25-70% of the copy
bandwidth).

Scales: per channel, the accumulator is scaled once at the end. Per group, a K tile that lies
inside one group (``group_size % block_k == 0``) multiplies its weight tile by the group's
[block_n] scales before the dot; any other group size loads one scale per weight element
(correct for every group size, slower). The GEMV scales each thread's sum of 16 bytes'
products once where they lie in one group (group sizes that are multiples of 16), at any
tile depth.

Every launch is shape-driven (no host reads, outputs allocated with ``torch.empty``), so the
wrappers can be captured in a CUDA graph once Triton has compiled them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from neuron_llm.backends.cuda import launch
from neuron_llm.backends.cuda.fused import round_sum, silu_mul_rounded
from neuron_llm.quant.formats import FP8_DTYPE

ACTIVATION_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
CONVERT_MODES = ("cvt", "add", "prmt")


@dataclass(frozen=True)
class Int8MatmulConfig:
    """Tile shape and launch parameters of one ``int8_linear`` call."""

    block_m: int
    """Rows of x per program: 1 selects the GEMV path, 16 or more the ``tl.dot`` path."""
    block_n: int
    """Output columns (weight rows) per program."""
    block_k: int
    """Input features per loop step."""
    split_k: int = 1
    """Programs sharing one output tile, each over a contiguous range of K."""
    num_warps: int = 4
    num_stages: int = 3
    """Software-pipelining depth of the K loop (loads in flight ahead of their use)."""
    group_m: int = 8
    """Row tiles walked together so that a column of weight tiles stays in L2 (prefill)."""
    convert: str = "prmt"
    """GEMV path, int8 -> float32: "cvt" (the conversion instruction, 16 results a clock per SM),
    "add" (sign-extend, integer add, float subtract) or "prmt" (one byte permute builds the float's
    bits, then the subtract; PTX, so "add" under Triton's interpreter)."""
    reduce_in_thread: bool = True
    """GEMV path: each step adds its products over the K elements a thread holds into one
    accumulator (a [block_k / 16 or 8, block_n] one) instead of one per weight element."""
    prefetch: bool = False
    """GEMV path: the next weight tile is loaded before the current one is used (two in flight)."""

    def __post_init__(self) -> None:
        if self.convert not in CONVERT_MODES:
            raise ValueError(f"convert={self.convert!r}: expected one of {CONVERT_MODES}")


@dataclass(frozen=True)
class RotaryWrite:
    """What lets the merged Q/K/V GEMV of one token finish the attention's inputs itself, as
    ``fused.rotary_write_kv`` after it would: RoPE at the token's position, and its KV-cache slot."""

    cos: torch.Tensor
    """The token's angles, ``head_dim`` of them (rotate-half layout), in the activation dtype."""
    sin: torch.Tensor
    key_cache: torch.Tensor
    """[num_blocks, block_size, num_kv_heads, head_dim], contiguous: written in place."""
    value_cache: torch.Tensor
    slot_mapping: torch.Tensor
    """The token's flat slot, int32 or int64 [1]."""


@dataclass(frozen=True)
class ResidualAdd:
    """What lets the GEMV of one row make the next RMSNorm's input: the row stored is the
    product plus ``residual`` (the residual stream, as ``fused.fused_add_rms_norm`` adds it), and
    the sums of squares of each ``SQUARE_SUM_COLUMNS`` of its columns go to ``square_sums``,
    from which the GEMV after it norms the row (``NormInput``): no norm kernel between them."""

    residual: torch.Tensor
    """[1, out_features], the product's dtype."""
    square_sums: torch.Tensor
    """float32 [ceil(out_features / SQUARE_SUM_COLUMNS)], written (``square_sums_buffer``)."""


@dataclass(frozen=True)
class NormInput:
    """RMSNorm of a GEMV's one input row, from the square sums its producer stored (``ResidualAdd``):
    the products take x times ``weight``, and the sums 1 / rms(x) at the end. Not the norm kernel's
    bits: that rounds the normed row to x's dtype before the weight multiplies it."""

    weight: torch.Tensor
    """[in_features]."""
    eps: float
    square_sums: torch.Tensor


SQUARE_SUM_COLUMNS = 16
_SQUARE_SUM_COLUMNS = tl.constexpr(SQUARE_SUM_COLUMNS)


def square_sums_buffer(row: torch.Tensor) -> torch.Tensor:
    """Room for the square sums of one row like ``row`` [..., features] (``ResidualAdd``)."""
    return torch.empty(triton.cdiv(row.shape[-1], SQUARE_SUM_COLUMNS), dtype=torch.float32, device=row.device)


PREFETCH_MAX_PROGRAMS_PER_SM = 3
DEEP_GEMV_K = 2048
"""Depth of the one-byte (int8, fp8) per-channel GEMV's tiles where K reaches it and N is small."""


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few programs are plenty
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def _has_fp8(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (8, 9)


def _block_k_for_groups(group_size: int, block_k: int) -> int:
    """The largest power of two from 16 to ``block_k`` dividing ``group_size`` (one scale per K
    tile); ``block_k`` itself when none does, and each element is scaled on its own."""
    block = block_k
    while block >= 16:
        if group_size % block == 0:
            return block
        block //= 2
    return block_k


def default_config(
    m: int,
    n: int,
    k: int,
    group_size: int | None,
    num_sms: int,
    x_dtype: torch.dtype = torch.bfloat16,
    weight_bytes: int = 1,
) -> Int8MatmulConfig:
    """The tile shape used for an [m, k] x [k, n] product when the caller gives none.

    Decode shapes stream the weight: the GEMV for one row, 16-row dots up to 16 rows, 64-row
    dots up to 64. Prefill shapes use 128x128 tiles, 256x128 from 1024 rows (float32
    activations: 128x128, half as deep, to fit shared memory). Up to 512 rows, K is split
    until every multiprocessor has a program or a few. Chosen from the sweep of
    ``benchmarks/linear_kernels.py`` on an H100 at Llama-3-8B shapes (M = 1, 16, 64, 4096).
    The GEMV's tiles are from H200 sweeps, the deep one-byte tiles (``DEEP_GEMV_K``) from an
    H100's; an int8 GEMV prefetches only when its grid has at most
    ``PREFETCH_MAX_PROGRAMS_PER_SM`` programs per multiprocessor.
    """
    # A GEMV's threads scale their 16-byte sums by their group's scale (``_gemv_step``).
    is_scaled_sums = m == 1 and group_size is not None and group_size % 16 == 0
    is_wide_gemv = False
    if m == 1:
        # Tiles 512 bytes deep, a thread's products summed in the thread: few registers, so
        # four programs share a multiprocessor. Narrow tiles (16 rows) where they alone give
        # four programs a multiprocessor or at most two (then K splits four ways or more),
        # else 32 rows (int8: 64, below). H200 sweeps, int8: gate_up 30.4, down 16.0, o 6.1 us
        # against 33.8, 18.4, 7.1 with 256-deep tiles and an accumulator per element; bf16:
        # gate_up 53.6, o 9.2 us against 56.8, 10.3 with 128-deep ones; qkv 13.3 us wide, 17.1
        # narrow.
        narrow_tiles = triton.cdiv(n, 16)
        is_narrow = narrow_tiles <= 2 * num_sms or narrow_tiles >= 4 * num_sms
        if is_scaled_sums:
            # A thread's 16-byte sums take their group's scale, so tiles may span groups; they
            # cost more per program, and three programs a multiprocessor do best. H200 sweep at
            # group 128: qkv 9.4, o 6.7, gate_up 30.0, down 17.8 us against 9.9, 8.9, 49.2,
            # 27.0 with 64 x 128 tiles and 8 warps; o and down 8.3 and 23.1 us with 16 rows.
            is_narrow = narrow_tiles > 2 * num_sms
        # int8 weights between the two (Llama-3-8B's qkv) take 64-row tiles, two programs a
        # multiprocessor, no prefetch: H200, qkv 8.7 us against 9.4 with 32 rows (read floor 7.4).
        is_wide_gemv = weight_bytes == 1 and not is_narrow and not is_scaled_sums
        block_n = 16 if is_narrow else 64 if is_wide_gemv else 32
        config = Int8MatmulConfig(block_m=1, block_n=block_n, block_k=512 // weight_bytes)
        if weight_bytes == 1 and not is_scaled_sums and k >= DEEP_GEMV_K and narrow_tiles < 4 * num_sms:
            # One-byte weights with a scale a row, long K and fewer than four 16-row tiles a
            # multiprocessor: tiles 2048 deep and 8 warps, K split only to fill the
            # multiprocessors. A program's first tile (with PDL, loaded before the kernel
            # before ends) is a quarter of K or more, and no partial sums are combined. H100
            # sweep, no eviction hint: qkv 10.3, o 6.9, down 20.9 us against 10.5, 7.3, 21.2
            # with the tiles above (K split four ways). gate_up (1,792 tiles) took 40.9 us with
            # them and the hint, against 39.8 with the tiles above and no hint, so keeps those.
            config = Int8MatmulConfig(block_m=1, block_n=16, block_k=DEEP_GEMV_K, num_warps=8)
            return replace(config, split_k=split_k_for(narrow_tiles, triton.cdiv(k, DEEP_GEMV_K), num_sms, 1))
    elif m <= 16:
        # H200 sweep at M = 5 and 16: 64-column tiles, 128 deep for the smaller weights (qkv
        # 10.8, o 9.7 us) and 256 for the larger (gate_up 35.7, down 21.1 us), against 12.7,
        # 11.6, 45.3, 26.2 us with 32 x 256 tiles.
        config = Int8MatmulConfig(block_m=16, block_n=64, block_k=128 if n * k <= 32 * 2**20 else 256)
    elif m <= 64:
        config = Int8MatmulConfig(block_m=64, block_n=64, block_k=128)
    elif x_dtype == torch.float32:
        config = Int8MatmulConfig(block_m=128, block_n=128, block_k=32, num_warps=8)
    elif m < 1024:
        config = Int8MatmulConfig(block_m=128, block_n=128, block_k=64, num_warps=8)
    else:
        config = Int8MatmulConfig(block_m=256, block_n=128, block_k=64, num_warps=8)
    if group_size is not None and not is_scaled_sums:
        config = replace(config, block_k=_block_k_for_groups(group_size, config.block_k))
    if m <= 512:
        # GEMVs and decode tiles of 4096 weights per step want twice the programs of 8192-weight ones.
        is_small_step = config.block_m == 1 or config.block_m <= 16 and config.block_n * config.block_k <= 4096
        programs_per_sm = 3 if is_scaled_sums else 2 if is_wide_gemv else 4 if is_small_step else 2 if m <= 16 else 1
        num_tiles = triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)
        split_k = split_k_for(num_tiles, triton.cdiv(k, config.block_k), num_sms, programs_per_sm)
        config = replace(config, split_k=split_k)
        # A second tile in flight pays where few programs share a multiprocessor; where many
        # do, its registers cost more occupancy than it hides latency.
        is_sparse = num_tiles * split_k <= PREFETCH_MAX_PROGRAMS_PER_SM * num_sms
        if m == 1 and weight_bytes == 1 and is_sparse and not is_wide_gemv:
            # The tile carried to the next step is kept byte by byte, which costs the permute
            # and the thread's sums more instructions than they save (sm_90, a 32 x 256 tile:
            # 449 instructions a step with them, 330 without).
            config = replace(config, prefetch=True, convert="add", reduce_in_thread=False)
    return config


def split_k_for(num_tiles: int, num_k_blocks: int, num_sms: int, programs_per_sm: int = 2) -> int:
    """The smallest divisor of ``num_k_blocks`` giving at least ``programs_per_sm`` programs per multiprocessor.

    A divisor, so that every split covers the same number of whole K blocks (no masked tail).
    """
    wanted = triton.cdiv(programs_per_sm * num_sms, num_tiles)
    for split in range(1, num_k_blocks + 1):
        if num_k_blocks % split == 0 and split >= wanted:
            return split
    return num_k_blocks


@triton.jit
def _tile_ids(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped ordering: GROUP_M row tiles run beside each other over one column of weight tiles."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_rows = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_rows
    pid_n = (pid % num_pid_in_group) // group_rows
    return pid_m, pid_n


@triton.jit
def _weight_to_float32(q, IS_INT8: tl.constexpr, CONVERT: tl.constexpr, FP8: tl.constexpr):
    if FP8:
        return q.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    if not IS_INT8 or CONVERT == "cvt":
        return q.to(tl.float32)
    # 0x4B000000 is 2**23, whose mantissa counts in ones: its bits with q + 128 in the low byte
    # are the float 2**23 + 128 + q, exactly, and one subtract leaves q.
    if CONVERT == "prmt":
        # q + 128 is q's byte with its top bit flipped: one xor for four bytes, then one
        # permute a float picks its byte and the constant's three.
        bits = tl.inline_asm_elementwise(
            """{
            .reg .b32 u;
            xor.b32 u, $4, 0x80808080;
            prmt.b32 $0, u, 0x4B000000, 0x7540;
            prmt.b32 $1, u, 0x4B000000, 0x7541;
            prmt.b32 $2, u, 0x4B000000, 0x7542;
            prmt.b32 $3, u, 0x4B000000, 0x7543;
            }""",
            "=r,=r,=r,=r,r",
            [q],
            dtype=tl.int32,
            is_pure=True,
            pack=4,
        )
    else:
        bits = q.to(tl.int32) + 0x4B000080
    return bits.to(tl.float32, bitcast=True) - 8388736.0


@triton.jit
def _load_weight_tile(weight_ptr, rows_n, stride_wn, offs_k, K, EVEN_K: tl.constexpr, EVICTION: tl.constexpr):
    """The weight tile [BLOCK_K, BLOCK_N] (K contiguous in memory). EVICTION: the loads'
    ``eviction_policy``; "evict_first" where each weight byte is read once (the GEMV), so that
    the stream does not push out of L2 what the kernels around it will read again."""
    w_ptrs = weight_ptr + rows_n[None, :] * stride_wn + offs_k[:, None]
    if EVEN_K:
        return tl.load(w_ptrs, eviction_policy=EVICTION)
    return tl.load(w_ptrs, mask=offs_k[:, None] < K, other=0, eviction_policy=EVICTION)


@triton.jit
def _load_x(x_ptrs, mask, up_offset, EVEN_K: tl.constexpr, SWIGLU: tl.constexpr, FP8: tl.constexpr):
    """Activations at ``x_ptrs``; with SWIGLU, ``silu(gate) * up`` of the gate at ``x_ptrs`` and
    the up ``up_offset`` elements on, rounded as ``fused.silu_mul`` rounds; with FP8, e4m3 bytes."""
    if EVEN_K:
        x = tl.load(x_ptrs)
        if SWIGLU:
            x = silu_mul_rounded(x, tl.load(x_ptrs + up_offset))
    else:
        x = tl.load(x_ptrs, mask=mask, other=0)
        if SWIGLU:
            x = silu_mul_rounded(x, tl.load(x_ptrs + up_offset, mask=mask, other=0))
    if FP8:
        x = x.to(tl.float8e4nv, bitcast=True)
    return x


@triton.jit
def _group_scales(scale_ptr, rows_n, stride_sn, k, offs_k, K, GROUP_SIZE: tl.constexpr, SCALE_PER_TILE: tl.constexpr):
    """The scales of weight rows ``rows_n`` at K offsets ``offs_k``: [1, BLOCK_N] when the whole
    step from ``k`` lies in one group (SCALE_PER_TILE), else [len(offs_k), BLOCK_N]."""
    if SCALE_PER_TILE:  # a constexpr branch: the two shapes never meet in one kernel
        # A split_k that does not divide K's blocks leaves the last split whole steps past K:
        # their weights load as 0, and a scale read past the row (inf, NaN) would make 0 * inf.
        scales = tl.load(scale_ptr + rows_n * stride_sn + tl.minimum(k, K - 1) // GROUP_SIZE)[None, :]
    else:
        scales = tl.load(
            scale_ptr + rows_n[None, :] * stride_sn + offs_k[:, None] // GROUP_SIZE, mask=offs_k[:, None] < K, other=0.0
        )
    return scales


@triton.jit
def _gemv_step(
    acc_k,
    w,
    x_ptr,
    norm_weight_ptr,
    scale_ptr,
    rows_n,
    stride_sn,
    k,
    K,
    up_offset,
    IS_INT8: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    SCALE_PER_TILE: tl.constexpr,
    EVEN_K: tl.constexpr,
    CONVERT: tl.constexpr,
    SWIGLU: tl.constexpr,
    FP8: tl.constexpr,
    NORM: tl.constexpr,
    THREAD_K: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``acc_k`` [BLOCK_K // THREAD_K, BLOCK_N] plus the weight tile ``w`` at K offset ``k`` times x
    there (float32), each THREAD_K consecutive products summed first. NORM: x times the norm's
    weight (its scale by the row's mean square comes after the loop)."""
    offs_k = k + tl.arange(0, BLOCK_K)
    x = _load_x(x_ptr + offs_k, offs_k < K, up_offset, EVEN_K, SWIGLU, FP8).to(tl.float32)  # [BLOCK_K]
    if NORM and EVEN_K:
        x *= tl.load(norm_weight_ptr + offs_k).to(tl.float32)
    elif NORM:
        x *= tl.load(norm_weight_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
    wf = _weight_to_float32(w, IS_INT8, CONVERT, FP8)
    # Where a thread's THREAD_K elements lie in one group, their sum takes the group's scale
    # once; otherwise each weight takes its scale before the product.
    SCALE_SUMS: tl.constexpr = GROUP_SIZE > 0 and THREAD_K > 1 and GROUP_SIZE % THREAD_K == 0
    if GROUP_SIZE > 0 and not SCALE_SUMS:
        wf = wf * _group_scales(scale_ptr, rows_n, stride_sn, k, offs_k, K, GROUP_SIZE, SCALE_PER_TILE)
    products = wf * x[:, None]
    if THREAD_K > 1:
        # Triton's loads give a thread 16 bytes of a row, THREAD_K elements: their sum needs no
        # other thread, and the accumulator takes THREAD_K times fewer registers.
        products = tl.sum(tl.reshape(products, (BLOCK_K // THREAD_K, THREAD_K, products.shape[1])), axis=1)
    if SCALE_SUMS:
        chunk_k = k + THREAD_K * tl.arange(0, BLOCK_K // THREAD_K)  # each sum's first element
        products = products * _group_scales(scale_ptr, rows_n, stride_sn, k, chunk_k, K, GROUP_SIZE, SCALE_PER_TILE)
    return acc_k + products


@triton.jit
def _int8_matmul_kernel(
    x_ptr,
    x_scale_ptr,
    weight_ptr,
    scale_ptr,
    bias_ptr,
    out_ptr,
    partial_ptr,
    counter_ptr,
    cos_ptr,
    sin_ptr,
    key_cache_ptr,
    value_cache_ptr,
    slot_ptr,
    residual_ptr,
    square_sums_ptr,
    norm_weight_ptr,
    norm_sums_ptr,
    norm_eps,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_sn,
    stride_om,
    stride_split,
    stride_pm,
    up_offset,
    K_PER_SPLIT: tl.constexpr,
    SPLIT_K: tl.constexpr,
    IS_INT8: tl.constexpr,
    IS_SCALED: tl.constexpr,
    FP8: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    SCALE_PER_TILE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    CONVERT: tl.constexpr,
    THREAD_K: tl.constexpr,
    PREFETCH: tl.constexpr,
    SWIGLU: tl.constexpr,
    SWIGLU_OUT: tl.constexpr,
    ROPE_HEAD_DIM: tl.constexpr,
    ROPE_Q_ROWS: tl.constexpr,
    ROPE_ROWS: tl.constexpr,
    INLINE_PTX: tl.constexpr,
    ADD_RESIDUAL: tl.constexpr,
    NORM_BLOCK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    WIDE_OFFSETS: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] output tile over K split ``program_id(1)``.

    IS_INT8: the weight is int8. IS_SCALED: it has scales (int8 or fp8); otherwise it is 16-bit
    and GROUP_SIZE 0. GROUP_SIZE is 0 for per-channel scales. FP8: x and the weight hold e4m3
    bytes (uint8 tensors: a masked load's 0 cannot be cast to fp8), x with one scale a row at
    ``x_scale_ptr``. EVEN_K: every split is whole and inside K (no
    masks). With SPLIT_K > 1, ``partial_ptr`` is float32 [SPLIT_K, M, N] scratch and
    ``counter_ptr`` int32 counters, one per tile, zero on entry and on exit. With SWIGLU, x
    rows hold gate then up (``up_offset`` apart) and the product's input is silu(gate) * up.
    With ROPE_ROWS > 0 the weight is a merged Q/K/V one of a single row (``_store_rotary``).
    ADD_RESIDUAL (one row): the stored row is the sums plus ``residual_ptr``'s row, and each
    ``SQUARE_SUM_COLUMNS`` columns' sum of squares goes to ``square_sums_ptr``. NORM_BLOCK > 0 (one
    row): x is RMSNorm's input, its square sums at ``norm_sums_ptr`` (``_norm_scale``).
    WIDE_OFFSETS: offsets into x, the weight, the output or the scratch may pass 2**31.
    """
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if SWIGLU_OUT:
        # The tile's first half are gate rows, its second the up rows of the same columns; a
        # split's partial sums go to their rows' slots (past N, masked, for columns past N / 2).
        cols = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N) % (BLOCK_N // 2)
        rows_n = cols % (N // 2) + tl.arange(0, BLOCK_N) // (BLOCK_N // 2) * (N // 2)
        offs_n = tl.where(cols < N // 2, rows_n, N)
    elif ROPE_ROWS > 0:
        # A Q or K tile holds BLOCK_N / 2 dims of one head and the dims RoPE pairs them with,
        # half a head further; V's tiles are plain. Partial sums go to their rows' slots.
        tiles_per_head: tl.constexpr = ROPE_HEAD_DIM // BLOCK_N
        half = tl.arange(0, BLOCK_N) // (BLOCK_N // 2)
        dims = (pid_n % tiles_per_head) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N) % (BLOCK_N // 2)
        rotated = (pid_n // tiles_per_head) * ROPE_HEAD_DIM + half * (ROPE_HEAD_DIM // 2) + dims
        offs_n = tl.where(pid_n * BLOCK_N < ROPE_ROWS, rotated, offs_n)
        rows_n = offs_n
    else:
        rows_n = offs_n % N  # out-of-range columns load a valid weight row; their sums are not stored
    if WIDE_OFFSETS:
        # Some element offset (row times row stride) passes 2**31; int32 products would wrap.
        pid_m = pid_m.to(tl.int64)
        pid_k = pid_k.to(tl.int64)
        rows_n = rows_n.to(tl.int64)
    k_start = pid_k * K_PER_SPLIT

    if BLOCK_M == 1:
        # The first weight tile streams in while the kernel before finishes (see launch.py).
        w = _load_weight_tile(weight_ptr, rows_n, stride_wn, k_start + tl.arange(0, BLOCK_K), K, EVEN_K, "evict_first")
        launch.wait_for_inputs(USE_PDL)
        if NORM_BLOCK > 0:
            # Loaded with the first activations; used after the loop, so off the loop's path.
            offs_sums = tl.arange(0, NORM_BLOCK)
            norm_sums = tl.load(norm_sums_ptr + offs_sums, mask=offs_sums < tl.cdiv(K, _SQUARE_SUM_COLUMNS), other=0.0)
        x_row = x_ptr + pid_m * stride_xm
        acc_k = tl.zeros((BLOCK_K // THREAD_K, BLOCK_N), dtype=tl.float32)  # reduced over K after the loop
        if PREFETCH:
            # The next tile (the last one again at the end, from L1) is loaded before this one
            # is used, so two are in flight: the compiler does not pipeline loads that feed no
            # tl.dot.
            for step in range(0, K_PER_SPLIT, BLOCK_K):
                next_k = k_start + tl.minimum(step + BLOCK_K, K_PER_SPLIT - BLOCK_K)
                w_next = _load_weight_tile(
                    weight_ptr, rows_n, stride_wn, next_k + tl.arange(0, BLOCK_K), K, EVEN_K, "evict_first"
                )
                acc_k = _gemv_step(
                    acc_k, w, x_row, norm_weight_ptr, scale_ptr, rows_n, stride_sn, k_start + step, K, up_offset,
                    IS_INT8, GROUP_SIZE, SCALE_PER_TILE, EVEN_K, CONVERT, SWIGLU, FP8, NORM_BLOCK > 0, THREAD_K,
                    BLOCK_K,
                )  # fmt: skip
                w = w_next
        else:
            acc_k = _gemv_step(
                acc_k, w, x_row, norm_weight_ptr, scale_ptr, rows_n, stride_sn, k_start, K, up_offset,
                IS_INT8, GROUP_SIZE, SCALE_PER_TILE, EVEN_K, CONVERT, SWIGLU, FP8, NORM_BLOCK > 0, THREAD_K, BLOCK_K,
            )  # fmt: skip
            for step in range(BLOCK_K, K_PER_SPLIT, BLOCK_K):
                k = k_start + step
                w = _load_weight_tile(
                    weight_ptr, rows_n, stride_wn, k + tl.arange(0, BLOCK_K), K, EVEN_K, "evict_first"
                )
                acc_k = _gemv_step(
                    acc_k, w, x_row, norm_weight_ptr, scale_ptr, rows_n, stride_sn, k, K, up_offset,
                    IS_INT8, GROUP_SIZE, SCALE_PER_TILE, EVEN_K, CONVERT, SWIGLU, FP8, NORM_BLOCK > 0, THREAD_K,
                    BLOCK_K,
                )  # fmt: skip
        acc = tl.sum(acc_k, axis=0)[None, :]  # [1, BLOCK_N]
        if NORM_BLOCK > 0:
            acc *= _norm_scale(norm_sums, K, norm_eps)
        offs_m = pid_m + tl.arange(0, 1)
    else:
        launch.wait_for_inputs(USE_PDL)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rows_m = offs_m % M
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for step in range(0, K_PER_SPLIT, BLOCK_K):
            k = k_start + step
            offs_k = k + tl.arange(0, BLOCK_K)
            w = _load_weight_tile(weight_ptr, rows_n, stride_wn, offs_k, K, EVEN_K, "")  # row tiles share it in L2
            x_ptrs = x_ptr + rows_m[:, None] * stride_xm + offs_k[None, :]
            x = _load_x(x_ptrs, offs_k[None, :] < K, up_offset, EVEN_K, SWIGLU, FP8)  # [BLOCK_M, BLOCK_K]
            if FP8:
                # e4m3 to fp16 is exact, and the 16-row dot streams the weight: no need of fp8 dots.
                x = x.to(tl.float16)
                w_dequantized = w.to(tl.float8e4nv, bitcast=True).to(tl.float16)
            elif GROUP_SIZE == 0:
                w_dequantized = w.to(x.dtype)  # int8: exact, the scale comes after the loop
            else:
                # Scaling B rather than the dot's result keeps the accumulator in the tensor
                # cores across iterations (no wait for each dot), as the reference rounds it.
                scales = _group_scales(scale_ptr, rows_n, stride_sn, k, offs_k, K, GROUP_SIZE, SCALE_PER_TILE)
                w_dequantized = (w.to(tl.float32) * scales).to(x.dtype)
            acc = tl.dot(x, w_dequantized, acc, input_precision=DOT_PRECISION)

    if IS_SCALED and GROUP_SIZE == 0:
        acc *= tl.load(scale_ptr + rows_n * stride_sn)[None, :]
    if FP8:
        acc *= tl.load(x_scale_ptr + offs_m, mask=offs_m < M, other=0.0)[:, None]
    if SPLIT_K == 1:
        if ROPE_ROWS > 0:
            _store_rotary(
                out_ptr, cos_ptr, sin_ptr, key_cache_ptr, value_cache_ptr, slot_ptr, pid_n, acc, bias_ptr, rows_n,
                HAS_BIAS, ROPE_HEAD_DIM, ROPE_Q_ROWS, ROPE_ROWS, N - ROPE_ROWS, INLINE_PTX,
            )  # fmt: skip
        else:
            _store_output(
                out_ptr, stride_om, offs_m, pid_n, M, N, acc, bias_ptr, rows_n, residual_ptr, square_sums_ptr,
                HAS_BIAS, SWIGLU_OUT, ADD_RESIDUAL,
            )  # fmt: skip
    else:
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        partial_ptrs = partial_ptr + offs_m[:, None] * stride_pm + offs_n[None, :]
        tl.store(partial_ptrs + pid_k * stride_split, acc, mask=mask)
        # Every thread's partial sums are stored before the release of the count.
        tl.debug_barrier()
        tile = tl.program_id(0)
        num_arrived = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if num_arrived == SPLIT_K - 1:
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for _ in range(SPLIT_K):
                # The pointers step split by split: split * stride_split could pass 2**31.
                total += tl.load(partial_ptrs, mask=mask, other=0.0, cache_modifier=".cg")
                partial_ptrs += stride_split
            if ROPE_ROWS > 0:
                _store_rotary(
                    out_ptr, cos_ptr, sin_ptr, key_cache_ptr, value_cache_ptr, slot_ptr, pid_n, total, bias_ptr,
                    rows_n, HAS_BIAS, ROPE_HEAD_DIM, ROPE_Q_ROWS, ROPE_ROWS, N - ROPE_ROWS, INLINE_PTX,
                )  # fmt: skip
            else:
                _store_output(
                    out_ptr, stride_om, offs_m, pid_n, M, N, total, bias_ptr, rows_n, residual_ptr, square_sums_ptr,
                    HAS_BIAS, SWIGLU_OUT, ADD_RESIDUAL,
                )  # fmt: skip
            tl.atomic_xchg(counter_ptr + tile, 0, sem="relaxed", scope="gpu")


@triton.jit
def _as_stored(acc, bias_ptr, rows_n, HAS_BIAS: tl.constexpr, dtype: tl.constexpr):
    """The sums plus bias, in ``dtype``: what the projection would store, rounded as stored."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows_n).to(tl.float32)[None, :]
    return acc.to(dtype)


@triton.jit
def _norm_scale(square_sums, num_features, eps):
    """RMSNorm's 1 / rms of a row from its square sums, as ``fused.rms_norm`` takes it."""
    return tl.math.rsqrt(tl.sum(square_sums, axis=0) / num_features + eps)


@triton.jit
def _store_output(
    out_ptr,
    stride_om,
    offs_m,
    pid_n,
    M,
    N,
    acc,
    bias_ptr,
    rows_n,
    residual_ptr,
    square_sums_ptr,
    HAS_BIAS: tl.constexpr,
    SWIGLU_OUT: tl.constexpr,
    ADD_RESIDUAL: tl.constexpr,
):
    """The [BLOCK_M, BLOCK_N] tile ``acc`` plus bias, in the output's dtype; with SWIGLU_OUT (one
    row of gate then up sums) ``silu(gate) * up``, [1, BLOCK_N / 2] columns of an N / 2 wide output.
    With ADD_RESIDUAL (one row) that plus the residual's columns, rounded as ``fused.fused_add_rms_norm``
    rounds the sum, and the sums of squares of each ``SQUARE_SUM_COLUMNS`` of them."""
    BLOCK_N: tl.constexpr = acc.shape[1]
    out = _as_stored(acc, bias_ptr, rows_n, HAS_BIAS, out_ptr.dtype.element_ty)
    if ADD_RESIDUAL:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        is_column = offs_n < N
        residual = tl.load(residual_ptr + offs_n, mask=is_column, other=0.0)
        row = (out.to(tl.float32) + residual[None, :].to(tl.float32)).to(out.dtype)
        tl.store(out_ptr + offs_n[None, :], row, mask=is_column[None, :])
        row_f = tl.where(is_column[None, :], row.to(tl.float32), 0.0)
        squares = tl.reshape(row_f * row_f, (BLOCK_N // _SQUARE_SUM_COLUMNS, _SQUARE_SUM_COLUMNS))
        chunks = pid_n * (BLOCK_N // _SQUARE_SUM_COLUMNS) + tl.arange(0, BLOCK_N // _SQUARE_SUM_COLUMNS)
        tl.store(square_sums_ptr + chunks, tl.sum(squares, axis=1), mask=chunks * _SQUARE_SUM_COLUMNS < N)
        return
    if SWIGLU_OUT:
        gate, up = tl.split(tl.permute(tl.reshape(out, (2, BLOCK_N // 2)), (1, 0)))
        out = silu_mul_rounded(gate, up)[None, :]
        offs_n = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        width = N // 2
    else:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        width = N
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < width)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], out, mask=mask)


@triton.jit
def _product(x, angle, INLINE_PTX: tl.constexpr):
    """``fused._round_product`` in a kernel compiled with FP fusion: the product of two 16-bit
    values is exact in float32, so the compiler may narrow it to a 16-bit multiply and fuse that
    into the sum after it, skipping the product's rounding. ``mul.rn`` is never fused (PTX; the
    interpreter, which has none, fuses nothing)."""
    x_f = x.to(tl.float32)
    angle_f = tl.broadcast_to(angle.to(tl.float32)[None, :], x_f.shape)
    if INLINE_PTX:
        product = tl.inline_asm_elementwise(
            "mul.rn.f32 $0, $1, $2;", "=f,f,f", [x_f, angle_f], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        product = x_f * angle_f
    return product.to(x.dtype)


@triton.jit
def _store_rotary(
    query_ptr,
    cos_ptr,
    sin_ptr,
    key_cache_ptr,
    value_cache_ptr,
    slot_ptr,
    pid_n,
    acc,
    bias_ptr,
    rows_n,
    HAS_BIAS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    Q_ROWS: tl.constexpr,
    ROPE_ROWS: tl.constexpr,
    kv_row,
    INLINE_PTX: tl.constexpr,
):
    """One row's [1, BLOCK_N] tile of Q/K/V sums (rows ``rows_n``), rounded as the projection
    stores them, then as ``fused.rotary_write_kv`` goes on: Q rotated into the query output,
    K rotated and V into the caches' slot ``slot_ptr[0]`` (``kv_row`` elements a slot)."""
    BLOCK_N: tl.constexpr = acc.shape[1]
    HALF_TILE: tl.constexpr = BLOCK_N // 2
    HALF_DIM: tl.constexpr = HEAD_DIM // 2
    out = _as_stored(acc, bias_ptr, rows_n, HAS_BIAS, query_ptr.dtype.element_ty)
    first_row = pid_n * BLOCK_N
    slot = tl.load(slot_ptr).to(tl.int64)
    if first_row < ROPE_ROWS:
        x1, x2 = tl.split(tl.permute(tl.reshape(out, (2, HALF_TILE)), (1, 0)))
        x1 = x1[None, :]
        x2 = x2[None, :]
        head_first_row = first_row // HEAD_DIM * HEAD_DIM
        dims = (first_row - head_first_row) // 2 + tl.arange(0, HALF_TILE)
        cos_first = tl.load(cos_ptr + dims)
        cos_second = tl.load(cos_ptr + HALF_DIM + dims)
        sin_first = tl.load(sin_ptr + dims)
        sin_second = tl.load(sin_ptr + HALF_DIM + dims)
        out1 = round_sum(_product(x1, cos_first, INLINE_PTX), _product(-x2, sin_first, INLINE_PTX))
        out2 = round_sum(_product(x2, cos_second, INLINE_PTX), _product(x1, sin_second, INLINE_PTX))
        if first_row < Q_ROWS:
            dst = query_ptr + head_first_row + dims[None, :]
            tl.store(dst, out1)
            tl.store(dst + HALF_DIM, out2)
        else:
            dst = key_cache_ptr + slot * kv_row + (head_first_row - Q_ROWS) + dims[None, :]
            cache_dtype = key_cache_ptr.dtype.element_ty
            tl.store(dst, out1.to(cache_dtype))
            tl.store(dst + HALF_DIM, out2.to(cache_dtype))
    else:
        offs = slot * kv_row + (first_row - ROPE_ROWS) + tl.arange(0, BLOCK_N)
        tl.store(value_cache_ptr + offs[None, :], out.to(value_cache_ptr.dtype.element_ty))


def _check_int8_inputs(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int | None,
) -> None:
    if x.dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"x.dtype={x.dtype}: int8_linear takes activations in {ACTIVATION_DTYPES}")
    if weight.dtype != torch.int8 or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D int8 tensor [out, in], got {weight.dtype} {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if group_size is not None and (not isinstance(group_size, int) or group_size <= 0):
        raise ValueError(f"group_size={group_size!r}: must be a positive integer or None")
    num_groups = 1 if group_size is None else -(-in_features // group_size)
    if weight_scale.dtype != torch.float32 or tuple(weight_scale.shape) != (out_features, num_groups):
        raise ValueError(
            f"weight_scale must be float32 [{out_features}, {num_groups}] for group_size={group_size}, "
            f"got {weight_scale.dtype} {tuple(weight_scale.shape)}"
        )
    _check_shapes_and_devices(x, weight, bias, weight_scale)


def _check_shapes_and_devices(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *others: torch.Tensor
) -> None:
    """``x`` [..., in] against the 2-D ``weight`` [out, in], ``bias`` [out], every tensor on one device."""
    out_features, in_features = weight.shape
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"x.shape={tuple(x.shape)}: the last dimension must be in_features={in_features}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias.shape={tuple(bias.shape)}: must be [{out_features}]")
    tensors = [x, weight, *others] + ([] if bias is None else [bias])
    if any(t.device != x.device for t in tensors):
        raise ValueError(f"all tensors must be on one device, got {[str(t.device) for t in tensors]}")


def int8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    group_size: int | None = None,
    config: Int8MatmulConfig | None = None,
    *,
    silu_mul_input: bool = False,
    silu_mul_output: bool = False,
    rotary: RotaryWrite | None = None,
    residual: ResidualAdd | None = None,
    norm: NormInput | None = None,
) -> torch.Tensor:
    """``x @ dequantize(weight).T + bias`` with the int8 weight dequantized in registers.

    ``x`` is [..., in] in bf16, fp16 or fp32; ``weight`` int8 [out, in]; ``weight_scale``
    float32 [out, 1] (``group_size`` None) or [out, ceil(in / group_size)]; ``bias`` [out] or
    None. Products are summed in float32 (fp32 activations without tf32). ``config``
    overrides the tile shape (``default_config`` otherwise). Returns [..., out] in ``x.dtype``.
    ``silu_mul_input``: see ``_swiglu_input``; ``silu_mul_output``, ``rotary``, ``residual`` and
    ``norm``: see ``_launch``.
    """
    _check_int8_inputs(_swiglu_input(x, weight, silu_mul_input), weight, weight_scale, bias, group_size)
    return _launch(
        x, weight, weight_scale, bias, group_size, config, silu_mul_input, silu_mul_output, rotary, residual, norm
    )


def gemv_16bit(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: Int8MatmulConfig | None = None,
    *,
    silu_mul_input: bool = False,
    silu_mul_output: bool = False,
    rotary: RotaryWrite | None = None,
    residual: ResidualAdd | None = None,
    norm: NormInput | None = None,
) -> torch.Tensor:
    """``x @ weight.T + bias`` for a bf16/fp16 ``weight`` [out, in] and ``x`` [..., in] of its dtype.

    The GEMV of the int8 kernel on 16-bit weights, for decode rows: it streams the weight as
    the int8 GEMV does and, unlike cuBLAS, takes part in programmatic dependent launch, so a
    decode step's matmuls start loading while the kernel before them ends.
    ``silu_mul_input``: see ``_swiglu_input``; ``silu_mul_output``, ``rotary``, ``residual`` and
    ``norm``: see ``_launch``.
    """
    if weight.dtype not in (torch.bfloat16, torch.float16) or weight.dim() != 2:
        raise ValueError(
            f"weight must be a 2-D bf16 or fp16 tensor [out, in], got {weight.dtype} {tuple(weight.shape)}"
        )
    if x.dtype != weight.dtype:
        raise ValueError(f"x.dtype={x.dtype} must be the weight's dtype {weight.dtype}")
    _check_shapes_and_devices(_swiglu_input(x, weight, silu_mul_input), weight, bias)
    return _launch(x, weight, None, bias, None, config, silu_mul_input, silu_mul_output, rotary, residual, norm)


def fp8_rows_matmul(
    x_fp8: torch.Tensor,
    x_scale: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """fp8 W8A8 for a few rows, ``(x_fp8 * x_scale) @ (weight * weight_scale).T + bias``, by this
    kernel: the weight streams as an int8 one does (the GEMV for one row, 16-row tiles up to 16).

    ``x_fp8`` float8_e4m3fn [M, in] with float32 ``x_scale`` [M, 1]; ``weight`` float8_e4m3fn
    [out, in] with float32 ``weight_scale`` [out, 1]. Products are summed in float32 and scaled
    by both scales at the end. Returns [M, out] in ``out_dtype``.
    """
    if x_fp8.dim() != 2 or x_fp8.dtype != FP8_DTYPE or weight.dtype != FP8_DTYPE or weight.dim() != 2:
        raise ValueError(
            f"x_fp8 [M, in] and weight [out, in] must be 2-D {FP8_DTYPE}, got {x_fp8.dtype} "
            f"{tuple(x_fp8.shape)} and {weight.dtype} {tuple(weight.shape)}"
        )
    for name, scale, rows in (("x_scale", x_scale, x_fp8.shape[0]), ("weight_scale", weight_scale, weight.shape[0])):
        if scale.dtype != torch.float32 or tuple(scale.shape) != (rows, 1):
            raise ValueError(f"{name} must be float32 [{rows}, 1], got {scale.dtype} {tuple(scale.shape)}")
    if out_dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"out_dtype={out_dtype}: must be one of {ACTIVATION_DTYPES}")
    _check_shapes_and_devices(x_fp8, weight, bias, x_scale, weight_scale)
    if x_fp8.is_cuda and not _has_fp8(x_fp8.device):
        raise ValueError(f"fp8 matmuls need a GPU of compute capability 8.9 or newer, {x_fp8.device} is not one")
    x_scale = x_scale.reshape(-1).contiguous()  # one a row, at the row's index
    x_bytes, weight_bytes = x_fp8.view(torch.uint8), weight.view(torch.uint8)  # see _int8_matmul_kernel's FP8
    return _launch(
        x_bytes, weight_bytes, weight_scale, bias, None, None, False, False, x_scale=x_scale, out_dtype=out_dtype
    )


def _swiglu_input(x: torch.Tensor, weight: torch.Tensor, silu_mul_input: bool) -> torch.Tensor:
    """``x`` itself, or with ``silu_mul_input`` the gate half of ``x`` [..., 2 * in] (gate, then up).

    Then the product's input is ``silu(gate) * up``, computed as each activation tile is
    loaded and rounded as ``fused.silu_mul`` rounds: the result is that of the two kernels,
    and the down projection of a decode step needs no kernel of its own for SwiGLU. It pays
    where the product streams the weight (few rows); with many rows every column tile would
    recompute the activations.
    """
    if not silu_mul_input:
        return x
    in_features = weight.shape[-1] if weight.dim() == 2 else -1
    if x.dim() == 0 or x.shape[-1] != 2 * in_features:
        raise ValueError(
            f"x.shape={tuple(x.shape)}: with silu_mul_input the last dimension must be "
            f"2 * in_features = {2 * in_features} (gate, then up)"
        )
    return x[..., :in_features]


def _rotary_rows(rotary: RotaryWrite, out_features: int, x: torch.Tensor) -> tuple[int, int, int]:
    """(head_dim, Q's rows, Q's and K's rows) of a merged Q/K/V weight of ``out_features`` rows
    whose K and V heads are the caches'; ValueError on inputs that don't fit together."""
    key_cache, value_cache = rotary.key_cache, rotary.value_cache
    tensors = (rotary.cos, rotary.sin, key_cache, value_cache, rotary.slot_mapping)
    if any(t.device != x.device for t in tensors):
        raise ValueError(f"rotary's tensors must be on x's device {x.device}, got {[str(t.device) for t in tensors]}")
    if key_cache.dim() != 4 or value_cache.shape != key_cache.shape:
        raise ValueError(
            f"key_cache {tuple(key_cache.shape)} and value_cache {tuple(value_cache.shape)} must both be "
            "[num_blocks, block_size, num_kv_heads, head_dim]"
        )
    if not (key_cache.is_contiguous() and value_cache.is_contiguous()):
        raise ValueError("key_cache and value_cache must be contiguous: the kernel writes them in place")
    num_kv_heads, head_dim = key_cache.shape[2:]
    q_rows = out_features - 2 * num_kv_heads * head_dim
    if head_dim % 2 or q_rows <= 0 or q_rows % head_dim:
        raise ValueError(
            f"out_features={out_features} is not Q, K and V of {num_kv_heads} KV heads of an even head_dim={head_dim}"
        )
    for name, angles in (("cos", rotary.cos), ("sin", rotary.sin)):
        if angles.numel() != head_dim or angles.dtype != x.dtype or not angles.is_contiguous():
            raise ValueError(
                f"{name} must be the token's {head_dim} angles in {x.dtype}, contiguous, got {angles.dtype} "
                f"{tuple(angles.shape)}"
            )
    if rotary.slot_mapping.numel() != 1 or rotary.slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"slot_mapping must be one int32 or int64 slot, got {rotary.slot_mapping.dtype} "
            f"{tuple(rotary.slot_mapping.shape)}"
        )
    return head_dim, q_rows, q_rows + num_kv_heads * head_dim


def _check_row(row: torch.Tensor, name: str, features: int, dtype: torch.dtype | None, device: torch.device) -> None:
    """``row`` holds ``features`` contiguous values (of ``dtype``, when given) on ``device``."""
    if row.numel() != features or row.shape[-1] != features or not row.is_contiguous() or row.device != device:
        raise ValueError(
            f"{name} must be one contiguous row of {features} values on {device}, "
            f"got {tuple(row.shape)} on {row.device}"
        )
    if dtype is not None and row.dtype != dtype:
        raise ValueError(f"{name} dtype {row.dtype} must be x's {dtype}")


def _check_square_sums(square_sums: torch.Tensor, features: int, device: torch.device) -> None:
    count = triton.cdiv(features, SQUARE_SUM_COLUMNS)
    if square_sums.dtype != torch.float32 or square_sums.shape != (count,) or square_sums.device != device:
        raise ValueError(
            f"square_sums must be float32 [{count}] on {device} (square_sums_buffer), "
            f"got {square_sums.dtype} {tuple(square_sums.shape)} on {square_sums.device}"
        )


def _offset_span(tensor: torch.Tensor) -> int:
    """One past the largest element offset a kernel computes into ``tensor``."""
    if tensor.numel() == 0:
        return 0
    return 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))


def _launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    group_size: int | None,
    config: Int8MatmulConfig | None,
    silu_mul_input: bool,
    silu_mul_output: bool,
    rotary: RotaryWrite | None = None,
    residual: ResidualAdd | None = None,
    norm: NormInput | None = None,
    x_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The product of the checked inputs. With ``silu_mul_output`` the weight's rows are gate
    then up ([2 * intermediate, in], as ``gate_up_proj`` merges them) and the result is
    ``silu(gate) * up`` [..., intermediate], rounded as the projection then ``fused.silu_mul``
    round: the two kernels' result from the GEMV alone (one-row configs only, block_m 1).

    With ``rotary`` the weight's rows are Q, K then V of one token's heads (``qkv_proj``), and
    the result is the rotated query [1, num_heads * head_dim]; the rotated key and the value go
    to the caches. Bits as the projection then ``fused.rotary_write_kv``, in one launch (one
    row only; tiles of whole heads' halves, their ``block_n`` halved until a head holds whole
    tiles).

    With ``residual`` the row stored is the product plus the residual row, and its square sums
    are written; with ``norm`` the input row is RMSNorm's input, normed from its square sums
    (one row, GEMV configs only, each)."""
    out_features, in_features = weight.shape
    x2 = x.reshape(-1, x.shape[-1])  # [M, K], or [M, 2K] of gate and up
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    copies_weight = weight.stride(-1) != 1
    if copies_weight:
        weight = weight.contiguous()
    is_int8, is_scaled = weight.dtype == torch.int8, weight_scale is not None
    weight_scale = weight_scale.contiguous() if weight_scale is not None else x2  # not read unscaled
    bias = bias.contiguous() if bias is not None else None  # read with a stride of 1
    num_rows = x2.shape[0]
    if silu_mul_output and (silu_mul_input or out_features % 2):
        raise ValueError(f"silu_mul_output needs an even out_features (got {out_features}) and no silu_mul_input")
    out_width = out_features // 2 if silu_mul_output else out_features
    if rotary is not None:
        if silu_mul_input or silu_mul_output or num_rows != 1:
            raise ValueError(f"rotary takes one row ({num_rows} given) and no SwiGLU input or output")
        head_dim, q_rows, rope_rows = _rotary_rows(rotary, out_features, x)
        out_width = q_rows
    if residual is not None:
        if silu_mul_output or rotary is not None or num_rows != 1:
            raise ValueError(f"residual takes one row ({num_rows} given) and a plain output (no SwiGLU or rotary)")
        _check_row(residual.residual, "residual", out_features, x.dtype, x.device)
        _check_square_sums(residual.square_sums, out_features, x.device)
    if norm is not None:
        if silu_mul_input or num_rows != 1:
            raise ValueError(f"norm takes one row ({num_rows} given) and no SwiGLU input")
        _check_row(norm.weight, "norm weight", in_features, None, x.device)
        _check_square_sums(norm.square_sums, in_features, x.device)
    out_dtype = out_dtype or x.dtype
    out = torch.empty(num_rows, out_width, dtype=out_dtype, device=x.device)  # [M, N] or [M, N / 2]
    if num_rows == 0:
        return out.reshape(*x.shape[:-1], out_width)
    if config is None:
        config = default_config(
            num_rows, out_features, in_features, group_size, _num_sms(x.device), out_dtype, weight.element_size()
        )
    is_row_epilogue = silu_mul_output or rotary is not None or residual is not None or norm is not None
    if is_row_epilogue and config.block_m != 1:
        raise ValueError(
            f"silu_mul_output, rotary, residual and norm run in the GEMV (block_m=1, one row by default), got {config}"
        )
    if residual is not None and config.block_n % SQUARE_SUM_COLUMNS:
        raise ValueError(f"residual needs block_n a multiple of {SQUARE_SUM_COLUMNS}, got {config}")
    if rotary is not None:
        block_n = config.block_n
        while head_dim % block_n:
            block_n //= 2
        config = replace(config, block_n=block_n)

    k_per_split = triton.cdiv(triton.cdiv(in_features, config.split_k), config.block_k) * config.block_k
    split_k = triton.cdiv(in_features, k_per_split)  # no empty splits
    num_tiles = triton.cdiv(num_rows, config.block_m) * triton.cdiv(out_features, config.block_n)
    inline_ptx = not triton.knobs.runtime.interpret  # the interpreter runs none
    convert = "add" if config.convert == "prmt" and not inline_ptx else config.convert
    is_summed_in_thread = config.reduce_in_thread and config.block_m == 1
    thread_k = min(16 // weight.element_size(), config.block_k) if is_summed_in_thread else 1
    if split_k > 1:
        partial = torch.empty(split_k, num_rows, out_features, dtype=torch.float32, device=x.device)  # [S, M, N]
        counters = launch.split_counters(x.device, num_tiles)
    else:
        partial, counters = out, out  # not read
    rotary_ptrs = (
        (rotary.cos, rotary.sin, rotary.key_cache, rotary.value_cache, rotary.slot_mapping) if rotary else (out,) * 5
    )  # not read without
    residual_ptrs = (residual.residual, residual.square_sums) if residual else (out, out)  # not read without
    norm_ptrs = (norm.weight, norm.square_sums, norm.eps) if norm else (out, out, 0.0)
    _int8_matmul_kernel[(num_tiles, split_k)](
        x2,
        x_scale if x_scale is not None else x2,  # not read without
        weight,
        weight_scale,
        bias if bias is not None else weight_scale,
        out,
        partial,
        counters,
        *rotary_ptrs,
        *residual_ptrs,
        *norm_ptrs,
        num_rows,
        out_features,
        in_features,
        x2.stride(0),
        weight.stride(0),
        weight_scale.stride(0),
        out.stride(0),
        partial.stride(0),
        partial.stride(-2),
        in_features,
        K_PER_SPLIT=k_per_split,
        SPLIT_K=split_k,
        IS_INT8=is_int8,
        IS_SCALED=is_scaled,
        FP8=x_scale is not None,
        GROUP_SIZE=0 if group_size is None else group_size,
        SCALE_PER_TILE=group_size is not None and group_size % config.block_k == 0,
        HAS_BIAS=bias is not None,
        EVEN_K=in_features % k_per_split == 0,
        CONVERT=convert,
        THREAD_K=thread_k,
        PREFETCH=config.prefetch,
        SWIGLU=silu_mul_input,
        SWIGLU_OUT=silu_mul_output,
        ROPE_HEAD_DIM=head_dim if rotary else 0,
        ROPE_Q_ROWS=q_rows if rotary else 0,
        ROPE_ROWS=rope_rows if rotary else 0,
        INLINE_PTX=inline_ptx,
        ADD_RESIDUAL=residual is not None,
        NORM_BLOCK=triton.next_power_of_2(norm.square_sums.numel()) if norm else 0,
        DOT_PRECISION="ieee" if out_dtype == torch.float32 else "tf32",
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        GROUP_M=config.group_m,
        WIDE_OFFSETS=max(_offset_span(t) for t in (x2, weight, out, partial)) > 2**31,
        **launch.pdl(x.device, reads_fresh_copy=copies_weight),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out.reshape(*x.shape[:-1], out_width)

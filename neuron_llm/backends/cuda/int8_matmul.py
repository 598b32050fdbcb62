"""int8 weight-only (W8A16) matmul in Triton: int8 bytes cross memory, dequantized in registers.

``out = x @ (q * scale).T + bias`` for ``x`` [..., in] in bf16/fp16/fp32, ``q`` int8 [out, in]
and float32 scales [out, 1] (per channel) or [out, ceil(in / group_size)] (per group), the
formats of ``neuron_llm.quant.formats``. One kernel covers every number of rows M:

- M = 1 (decode, one sequence): a GEMV. Each program owns ``block_n`` output columns and a
  range of K; it streams its int8 weight tile by tile, multiplies by x in float32 on the
  CUDA cores and reduces over K once at the end. The weight is read once in all, so the
  time is the weight's bytes over memory bandwidth.
- M > 1: a tiled ``tl.dot`` matmul whose B tile (the weight, [block_k, block_n]) is loaded
  as int8 and converted to the activation dtype in registers. Exact: int8 values fit any
  16-bit float. For small M (decode batches) it is still weight-streaming, with
  ``block_m`` = 16 (the smallest dot).

When the output tiles alone are too few to fill the GPU (few columns, small M), K is split
across ``split_k`` programs per tile. Each writes its float32 partial sums to a scratch
buffer and counts itself in with an atomic add on its tile's counter; the last to arrive adds
the partials up in split order (deterministic, unlike atomic adds of the sums), writes the
output and resets the counter to zero for the next call. One launch, no second pass. The
counters are one int32 buffer per device, allocated at the first split call: make that call
before capturing a CUDA graph, and don't run split calls on two streams of one device at once.

Scales: per channel, the accumulator is scaled once at the end. Per group, a K tile that lies
inside one group (``group_size % block_k == 0``) multiplies its weight tile by the group's
[block_n] scales before the dot (the GEMV: before the float32 product); any other group size
loads one scale per weight element (correct for every group size, slower).

Every launch is shape-driven (no host reads, outputs allocated with ``torch.empty``), so the
wrappers can be captured in a CUDA graph once Triton has compiled them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

ACTIVATION_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


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
    fast_convert: bool = True
    """GEMV path: int8 -> float32 by integer add and a float subtract instead of a conversion instruction."""


_TILE_COUNTERS: dict[torch.device, torch.Tensor] = {}
_MIN_COUNTERS = 1 << 16


def _tile_counters(device: torch.device, num_tiles: int) -> torch.Tensor:
    """The device's split-K counters (int32, all zero between calls), at least ``num_tiles`` of them."""
    counters = _TILE_COUNTERS.get(device)
    if counters is None or counters.numel() < num_tiles:
        counters = torch.zeros(max(num_tiles, _MIN_COUNTERS), dtype=torch.int32, device=device)
        _TILE_COUNTERS[device] = counters
    return counters


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few programs are plenty
    return torch.cuda.get_device_properties(device).multi_processor_count


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
    m: int, n: int, k: int, group_size: int | None, num_sms: int, x_dtype: torch.dtype = torch.bfloat16
) -> Int8MatmulConfig:
    """The tile shape used for an [m, k] x [k, n] product when the caller gives none.

    Decode shapes stream the weight: the GEMV for one row, 16-row dots up to 16 rows, 64-row
    dots up to 64. Prefill shapes use 128x128 tiles, 256x128 from 1024 rows (float32
    activations: 128x128, half as deep, to fit shared memory). Up to 512 rows, K is split
    until every multiprocessor has a program or a few. Chosen from the sweep of
    ``benchmarks/linear_kernels.py`` on an H100 at Llama-3-8B shapes (M = 1, 16, 64, 4096).
    """
    if m == 1:
        # Narrow tiles while they alone give four programs per multiprocessor, else wider ones and split K.
        block_n = 16 if triton.cdiv(n, 16) >= 4 * num_sms else 32
        config = Int8MatmulConfig(block_m=1, block_n=block_n, block_k=256)
    elif m <= 16:
        config = Int8MatmulConfig(block_m=16, block_n=32, block_k=256)
    elif m <= 64:
        config = Int8MatmulConfig(block_m=64, block_n=64, block_k=128)
    elif x_dtype == torch.float32:
        config = Int8MatmulConfig(block_m=128, block_n=128, block_k=32, num_warps=8)
    elif m < 1024:
        config = Int8MatmulConfig(block_m=128, block_n=128, block_k=64, num_warps=8)
    else:
        config = Int8MatmulConfig(block_m=256, block_n=128, block_k=64, num_warps=8)
    if group_size is not None:
        block_k = _block_k_for_groups(group_size, config.block_k)
        block_n = 32 if m == 1 else config.block_n
        config = replace(config, block_n=block_n, block_k=block_k)
    if m <= 512:
        # Decode tiles of 4 KiB of weight per step want twice the programs of 8 KiB ones.
        is_small_step = config.block_m <= 16 and config.block_n * config.block_k <= 4096
        programs_per_sm = 4 if is_small_step else 2 if m <= 16 else 1
        num_tiles = triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)
        split_k = split_k_for(num_tiles, triton.cdiv(k, config.block_k), num_sms, programs_per_sm)
        config = replace(config, split_k=split_k)
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
def _int8_to_float32(q, FAST: tl.constexpr):
    if FAST:
        # 0x4B000000 is 2**23, whose mantissa counts in ones: its bits plus (q + 128) are the
        # float 2**23 + 128 + q, exactly. One integer add and one float subtract.
        return (q.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
    return q.to(tl.float32)


@triton.jit
def _int8_matmul_kernel(
    x_ptr,
    weight_ptr,
    scale_ptr,
    bias_ptr,
    out_ptr,
    partial_ptr,
    counter_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_sn,
    stride_om,
    stride_split,
    stride_pm,
    K_PER_SPLIT: tl.constexpr,
    SPLIT_K: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    SCALE_PER_TILE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    FAST_CONVERT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] output tile over K split ``program_id(1)``.

    GROUP_SIZE is 0 for per-channel scales. EVEN_K: every split is whole and inside K (no
    masks). With SPLIT_K > 1, ``partial_ptr`` is float32 [SPLIT_K, M, N] scratch and
    ``counter_ptr`` int32 counters, one per tile, zero on entry and on exit.
    """
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_n = offs_n % N  # out-of-range columns load a valid weight row; their sums are not stored
    k_start = pid_k * K_PER_SPLIT

    if BLOCK_M == 1:
        acc_k = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)  # reduced over K after the loop
    else:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rows_m = offs_m % M
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    for step in range(0, K_PER_SPLIT, BLOCK_K):
        k = k_start + step
        offs_k = k + tl.arange(0, BLOCK_K)
        # w: [BLOCK_K, BLOCK_N], K contiguous in memory
        w_ptrs = weight_ptr + rows_n[None, :] * stride_wn + offs_k[:, None]
        if EVEN_K:
            w = tl.load(w_ptrs)
        else:
            w = tl.load(w_ptrs, mask=offs_k[:, None] < K, other=0)
        if GROUP_SIZE > 0:
            if SCALE_PER_TILE:
                group_scale = tl.load(scale_ptr + rows_n * stride_sn + k // GROUP_SIZE)  # [BLOCK_N]
            else:
                element_scale = tl.load(
                    scale_ptr + rows_n[None, :] * stride_sn + offs_k[:, None] // GROUP_SIZE,
                    mask=offs_k[:, None] < K,
                    other=0.0,
                )  # [BLOCK_K, BLOCK_N]
        if BLOCK_M == 1:
            x_ptrs = x_ptr + pid_m * stride_xm + offs_k
            if EVEN_K:
                x = tl.load(x_ptrs).to(tl.float32)
            else:
                x = tl.load(x_ptrs, mask=offs_k < K, other=0.0).to(tl.float32)  # [BLOCK_K]
            wf = _int8_to_float32(w, FAST_CONVERT)
            if GROUP_SIZE > 0:
                if SCALE_PER_TILE:
                    wf = wf * group_scale[None, :]
                else:
                    wf = wf * element_scale
            acc_k += wf * x[:, None]
        else:
            x_ptrs = x_ptr + rows_m[:, None] * stride_xm + offs_k[None, :]
            if EVEN_K:
                x = tl.load(x_ptrs)
            else:
                x = tl.load(x_ptrs, mask=offs_k[None, :] < K, other=0.0)  # [BLOCK_M, BLOCK_K]
            if GROUP_SIZE == 0:
                w_dequantized = w.to(x.dtype)  # exact: the scale comes after the loop
            elif SCALE_PER_TILE:
                # Scaling B rather than the dot's result keeps the accumulator in the tensor
                # cores across iterations (no wait for each dot), as the reference rounds it.
                w_dequantized = (w.to(tl.float32) * group_scale[None, :]).to(x.dtype)
            else:
                w_dequantized = (w.to(tl.float32) * element_scale).to(x.dtype)
            acc = tl.dot(x, w_dequantized, acc, input_precision=DOT_PRECISION)

    if BLOCK_M == 1:
        acc = tl.sum(acc_k, axis=0)[None, :]  # [1, BLOCK_N]
        offs_m = pid_m + tl.arange(0, 1)
    if GROUP_SIZE == 0:
        acc *= tl.load(scale_ptr + rows_n * stride_sn)[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    if SPLIT_K == 1:
        _store_output(out_ptrs, acc, bias_ptr, rows_n, mask, HAS_BIAS)
    else:
        partial_ptrs = partial_ptr + offs_m[:, None] * stride_pm + offs_n[None, :]
        tl.store(partial_ptrs + pid_k * stride_split, acc, mask=mask)
        # Every thread's partial sums are stored before the release of the count.
        tl.debug_barrier()
        tile = tl.program_id(0)
        num_arrived = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if num_arrived == SPLIT_K - 1:
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for split in range(SPLIT_K):
                total += tl.load(partial_ptrs + split * stride_split, mask=mask, other=0.0, cache_modifier=".cg")
            _store_output(out_ptrs, total, bias_ptr, rows_n, mask, HAS_BIAS)
            tl.atomic_xchg(counter_ptr + tile, 0, sem="relaxed", scope="gpu")


@triton.jit
def _store_output(out_ptrs, acc, bias_ptr, rows_n, mask, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows_n).to(tl.float32)[None, :]
    tl.store(out_ptrs, acc.to(out_ptrs.dtype.element_ty), mask=mask)


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
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"x.shape={tuple(x.shape)}: the last dimension must be in_features={in_features}")
    if group_size is not None and (not isinstance(group_size, int) or group_size <= 0):
        raise ValueError(f"group_size={group_size!r}: must be a positive integer or None")
    num_groups = 1 if group_size is None else -(-in_features // group_size)
    if weight_scale.dtype != torch.float32 or tuple(weight_scale.shape) != (out_features, num_groups):
        raise ValueError(
            f"weight_scale must be float32 [{out_features}, {num_groups}] for group_size={group_size}, "
            f"got {weight_scale.dtype} {tuple(weight_scale.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias.shape={tuple(bias.shape)}: must be [{out_features}]")
    tensors = [x, weight, weight_scale] + ([] if bias is None else [bias])
    if any(t.device != x.device for t in tensors):
        raise ValueError(f"all tensors must be on one device, got {[str(t.device) for t in tensors]}")


def int8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    group_size: int | None = None,
    config: Int8MatmulConfig | None = None,
) -> torch.Tensor:
    """``x @ dequantize(weight).T + bias`` with the int8 weight dequantized in registers.

    ``x`` is [..., in] in bf16, fp16 or fp32; ``weight`` int8 [out, in]; ``weight_scale``
    float32 [out, 1] (``group_size`` None) or [out, ceil(in / group_size)]; ``bias`` [out] or
    None. Products are summed in float32 (fp32 activations without tf32). ``config``
    overrides the tile shape (``default_config`` otherwise). Returns [..., out] in ``x.dtype``.
    """
    _check_int8_inputs(x, weight, weight_scale, bias, group_size)
    out_features, in_features = weight.shape
    x2 = x.reshape(-1, in_features)  # [M, K]
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    weight_scale = weight_scale.contiguous()
    num_rows = x2.shape[0]
    out = torch.empty(num_rows, out_features, dtype=x.dtype, device=x.device)  # [M, N]
    if num_rows == 0:
        return out.reshape(*x.shape[:-1], out_features)
    if config is None:
        config = default_config(num_rows, out_features, in_features, group_size, _num_sms(x.device), x.dtype)

    k_per_split = triton.cdiv(triton.cdiv(in_features, config.split_k), config.block_k) * config.block_k
    split_k = triton.cdiv(in_features, k_per_split)  # no empty splits
    num_tiles = triton.cdiv(num_rows, config.block_m) * triton.cdiv(out_features, config.block_n)
    if split_k > 1:
        partial = torch.empty(split_k, num_rows, out_features, dtype=torch.float32, device=x.device)  # [S, M, N]
        counters = _tile_counters(x.device, num_tiles)
    else:
        partial, counters = out, out  # not read
    _int8_matmul_kernel[(num_tiles, split_k)](
        x2,
        weight,
        weight_scale,
        bias if bias is not None else weight_scale,
        out,
        partial,
        counters,
        num_rows,
        out_features,
        in_features,
        x2.stride(0),
        weight.stride(0),
        weight_scale.stride(0),
        out.stride(0),
        partial.stride(0),
        partial.stride(-2),
        K_PER_SPLIT=k_per_split,
        SPLIT_K=split_k,
        GROUP_SIZE=0 if group_size is None else group_size,
        SCALE_PER_TILE=group_size is not None and group_size % config.block_k == 0,
        HAS_BIAS=bias is not None,
        EVEN_K=in_features % k_per_split == 0,
        FAST_CONVERT=config.fast_convert,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        GROUP_M=config.group_m,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out.reshape(*x.shape[:-1], out_features)

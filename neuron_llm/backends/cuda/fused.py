"""Fused Triton kernels around attention: RMSNorm with the residual add, and RoPE with the KV write.

Each kernel does in one pass over memory what the reference model does in several, rounding
where the reference rounds, so that its results match ``layers/norm.py``,
``layers/rotary.py`` and ``TorchBackend.write_kv_cache`` up to float32 summation order. They
are compiled without multiply-add fusion: a fused ``x1 * cos - x2 * sin`` would skip the
rounding of each product that torch does, and differ from it in the last bit.

- ``rms_norm``: ``weight * (x / rms(x)).to(x.dtype)`` with the mean square taken in float32.
- ``fused_add_rms_norm``: the residual add ``x + residual`` (rounded to the input dtype, as
  the model's ``hidden + ...`` is), then the norm of that sum; returns both.
- ``rotary_write_kv``: ``x * cos + rotate_half(x) * sin`` for query and key (each product
  and the sum rounded to the input dtype), then rotated keys and values stored at their
  slots of the paged cache.

One program per token (row); a row is held in registers, so the norms take up to
``MAX_NORM_FEATURES`` features. The wrappers allocate their outputs with ``torch.empty`` and
read nothing on the host, so they can be captured in a CUDA graph; on Hopper they launch
with programmatic dependent launch (``launch.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from neuron_llm.backends.cuda import launch

MAX_NORM_FEATURES = 32768
"""Largest row the norm kernels hold in registers (Llama 3 405B's hidden size is 16384)."""


def _norm_warps(block: int) -> int:
    return max(1, min(16, block // 512))


@triton.jit
def _rms_norm_row(x, weight, num_features, eps, OUT_DTYPE: tl.constexpr):
    """RMSNorm of one row ``x`` [BLOCK] (masked lanes zero) as ``layers/norm.py`` computes it."""
    xf = x.to(tl.float32)
    mean_square = tl.sum(xf * xf, axis=0) / num_features
    normed = (xf * tl.math.rsqrt(mean_square + eps)).to(x.dtype)  # back to the input dtype
    return (normed.to(tl.float32) * weight.to(tl.float32)).to(OUT_DTYPE)


@triton.jit
def _load_residual_sum(x_ptr, residual_ptr, new_residual_ptr, offs, mask, HAS_RESIDUAL: tl.constexpr):
    """A row of x, or of ``x + residual`` rounded to x's dtype (also stored, as the new residual)."""
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x.dtype)
        tl.store(new_residual_ptr + offs, x, mask=mask)
    return x


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    new_residual_ptr,
    num_features,
    stride_x,
    stride_residual,
    stride_out,
    stride_new_residual,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < num_features
    weight = tl.load(weight_ptr + offs, mask=mask, other=0.0)  # no kernel writes it: before the wait
    launch.wait_for_inputs(USE_PDL)
    x = _load_residual_sum(
        x_ptr + row * stride_x,
        residual_ptr + row * stride_residual,
        new_residual_ptr + row * stride_new_residual,
        offs,
        mask,
        HAS_RESIDUAL,
    )
    out = _rms_norm_row(x, weight, num_features, eps, out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_out + offs, out, mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as [rows, features] with unit stride along features (a copy only if it has none)."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2


def _check_norm_inputs(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> None:
    if x.dim() == 0 or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor [..., hidden], got {x.dtype} {tuple(x.shape)}")
    hidden = x.shape[-1]
    if tuple(weight.shape) != (hidden,):
        raise ValueError(f"weight.shape={tuple(weight.shape)}: must be [{hidden}], the last dimension of x")
    if hidden > MAX_NORM_FEATURES:
        raise ValueError(f"hidden size {hidden} exceeds MAX_NORM_FEATURES={MAX_NORM_FEATURES}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(
            f"residual must match x ({x.dtype} {tuple(x.shape)}), got {residual.dtype} {tuple(residual.shape)}"
        )
    tensors = [x, weight] + ([] if residual is None else [residual])
    if any(t.device != x.device for t in tensors):
        raise ValueError(f"all tensors must be on one device, got {[str(t.device) for t in tensors]}")


def _launch_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    _check_norm_inputs(x, weight, residual)
    hidden = x.shape[-1]
    x2 = _rows(x)  # [rows, hidden]
    out = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    residual2 = new_residual = None
    if residual is not None:
        residual2 = _rows(residual)
        new_residual = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0] > 0:
        block = triton.next_power_of_2(hidden)
        _rms_norm_kernel[(x2.shape[0],)](
            x2,
            residual2 if residual2 is not None else x2,
            weight.contiguous(),  # read before the PDL wait: a copy goes in stream order
            out,
            new_residual if new_residual is not None else out,
            hidden,
            x2.stride(0),
            residual2.stride(0) if residual2 is not None else 0,
            out.stride(0),
            new_residual.stride(0) if new_residual is not None else 0,
            eps,
            HAS_RESIDUAL=residual is not None,
            BLOCK=block,
            **launch.pdl(x.device, reads_fresh_copy=not weight.is_contiguous()),
            num_warps=_norm_warps(block),
            enable_fp_fusion=False,
        )
    out = out.reshape(x.shape)
    return out, None if new_residual is None else new_residual.reshape(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of ``x`` [..., hidden] with ``weight`` [hidden], as ``layers.norm.RMSNorm``.

    Returns [..., hidden] in the promoted dtype of ``x`` and ``weight`` (what ``weight * x``
    gives in the reference).
    """
    out, _ = _launch_norm(x, None, weight, eps)
    return out


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``new_residual = x + residual`` (in their dtype) and ``rms_norm(new_residual)``, in one pass.

    ``x`` and ``residual`` are [..., hidden] of one dtype, ``weight`` [hidden]. Returns
    ``(normed, new_residual)``: the decoder layer's next norm output and its residual stream.
    """
    if residual is None:
        raise ValueError("residual is None: use rms_norm for a norm without a residual add")
    out, new_residual = _launch_norm(x, residual, weight, eps)
    assert new_residual is not None
    return out, new_residual


@triton.jit
def _round_product(x, angle):
    """``x * angle[None, :]`` computed in float32 and rounded to x's dtype, as torch does."""
    return (x.to(tl.float32) * angle.to(tl.float32)[None, :]).to(x.dtype)


@triton.jit
def round_sum(a, b):
    return (a.to(tl.float32) + b.to(tl.float32)).to(a.dtype)


@triton.jit
def _rotate_heads(
    src_ptr,
    dst_ptr,
    cos_first,
    cos_second,
    sin_first,
    sin_second,
    stride_src_head,
    stride_dst_head,
    num_heads,
    HALF_DIM: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """Rotate all heads of one token; return the rotated halves [BLOCK_HEADS, BLOCK_HALF] each.

    With x = [x1 | x2], rotate_half(x) = [-x2 | x1]: the first half becomes x1*cos - x2*sin,
    the second x2*cos + x1*sin, each product and sum rounded to the input dtype.
    """
    heads = tl.arange(0, BLOCK_HEADS)
    dims = tl.arange(0, BLOCK_HALF)
    mask = (heads[:, None] < num_heads) & (dims[None, :] < HALF_DIM)
    first_ptrs = src_ptr + heads[:, None] * stride_src_head + dims[None, :]
    x1 = tl.load(first_ptrs, mask=mask, other=0.0)
    x2 = tl.load(first_ptrs + HALF_DIM, mask=mask, other=0.0)
    out1 = round_sum(_round_product(x1, cos_first), _round_product(-x2, sin_first))
    out2 = round_sum(_round_product(x2, cos_second), _round_product(x1, sin_second))
    dst_ptrs = dst_ptr + heads[:, None] * stride_dst_head + dims[None, :]
    tl.store(dst_ptrs, out1, mask=mask)
    tl.store(dst_ptrs + HALF_DIM, out2, mask=mask)
    return out1, out2


@triton.jit
def _rotary_write_kv_kernel(
    query_ptr,
    key_ptr,
    value_ptr,
    cos_ptr,
    sin_ptr,
    query_out_ptr,
    key_out_ptr,
    key_cache_ptr,
    value_cache_ptr,
    slot_mapping_ptr,
    num_heads,
    num_kv_heads,
    stride_query_token,
    stride_query_head,
    stride_key_token,
    stride_key_head,
    stride_value_token,
    stride_value_head,
    stride_cos_token,
    stride_sin_token,
    HALF_DIM: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_KV_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head_dim = 2 * HALF_DIM
    dims = tl.arange(0, BLOCK_HALF)
    dim_mask = dims < HALF_DIM
    launch.wait_for_inputs(USE_PDL)
    cos_row = cos_ptr + token * stride_cos_token + dims
    sin_row = sin_ptr + token * stride_sin_token + dims
    cos_first = tl.load(cos_row, mask=dim_mask, other=0.0)
    cos_second = tl.load(cos_row + HALF_DIM, mask=dim_mask, other=0.0)
    sin_first = tl.load(sin_row, mask=dim_mask, other=0.0)
    sin_second = tl.load(sin_row + HALF_DIM, mask=dim_mask, other=0.0)

    _rotate_heads(
        query_ptr + token * stride_query_token,
        query_out_ptr + token * num_heads * head_dim,
        cos_first,
        cos_second,
        sin_first,
        sin_second,
        stride_query_head,
        head_dim,
        num_heads,
        HALF_DIM,
        BLOCK_HEADS,
        BLOCK_HALF,
    )
    key1, key2 = _rotate_heads(
        key_ptr + token * stride_key_token,
        key_out_ptr + token * num_kv_heads * head_dim,
        cos_first,
        cos_second,
        sin_first,
        sin_second,
        stride_key_head,
        head_dim,
        num_kv_heads,
        HALF_DIM,
        BLOCK_KV_HEADS,
        BLOCK_HALF,
    )

    # The caches are [num_blocks, block_size, num_kv_heads, head_dim]: slot s starts at s * kv_heads * head_dim.
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    heads = tl.arange(0, BLOCK_KV_HEADS)
    mask = (heads[:, None] < num_kv_heads) & dim_mask[None, :]
    cache_offs = slot * num_kv_heads * head_dim + heads[:, None] * head_dim + dims[None, :]
    cache_dtype = key_cache_ptr.dtype.element_ty
    tl.store(key_cache_ptr + cache_offs, key1.to(cache_dtype), mask=mask)
    tl.store(key_cache_ptr + cache_offs + HALF_DIM, key2.to(cache_dtype), mask=mask)
    value_ptrs = value_ptr + token * stride_value_token + heads[:, None] * stride_value_head + dims[None, :]
    value1 = tl.load(value_ptrs, mask=mask, other=0.0)
    value2 = tl.load(value_ptrs + HALF_DIM, mask=mask, other=0.0)
    tl.store(value_cache_ptr + cache_offs, value1.to(value_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(value_cache_ptr + cache_offs + HALF_DIM, value2.to(value_cache_ptr.dtype.element_ty), mask=mask)


def _heads_view(x: torch.Tensor, name: str) -> torch.Tensor:
    """``x`` [tokens, heads, head_dim] with unit stride along head_dim (a copy only if it has none)."""
    if x.dim() != 3:
        raise ValueError(f"{name} must be [num_tokens, num_heads, head_dim], got shape {tuple(x.shape)}")
    return x if x.stride(-1) == 1 else x.contiguous()


def _angles_rows(x: torch.Tensor, name: str, num_tokens: int, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """cos or sin, [num_tokens, 1, head_dim] or [num_tokens, head_dim], as [num_tokens, head_dim]."""
    if x.dtype != dtype:
        raise ValueError(f"{name}.dtype={x.dtype}: must be the query's dtype {dtype}")
    if x.shape not in ((num_tokens, 1, head_dim), (num_tokens, head_dim)):
        raise ValueError(
            f"{name}.shape={tuple(x.shape)}: must be [{num_tokens}, 1, {head_dim}] or [{num_tokens}, {head_dim}]"
        )
    rows = x.reshape(num_tokens, head_dim)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _check_rotary_inputs(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    num_tokens, _, head_dim = query.shape
    if head_dim % 2:
        raise ValueError(f"head_dim={head_dim}: RoPE rotates halves, so it must be even")
    if key.shape != value.shape or key.shape[0] != num_tokens or key.shape[2] != head_dim:
        raise ValueError(
            f"key {tuple(key.shape)} and value {tuple(value.shape)} must both be "
            f"[{num_tokens}, num_kv_heads, {head_dim}]"
        )
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise ValueError(f"query, key and value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    num_kv_heads = key.shape[1]
    for name, cache in (("key_cache", key_cache), ("value_cache", value_cache)):
        if cache.dim() != 4 or tuple(cache.shape[2:]) != (num_kv_heads, head_dim):
            raise ValueError(
                f"{name}.shape={tuple(cache.shape)}: must be [num_blocks, block_size, {num_kv_heads}, {head_dim}]"
            )
        if not cache.is_contiguous():
            raise ValueError(f"{name} must be contiguous: the kernel writes it in place")
    if value_cache.shape != key_cache.shape:
        raise ValueError(f"value_cache {tuple(value_cache.shape)} and key_cache {tuple(key_cache.shape)} differ")
    if slot_mapping.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"slot_mapping must be int64 or int32, got {slot_mapping.dtype}")
    launch.check_per_row("slot_mapping", slot_mapping, num_tokens)
    tensors = (query, key, value, key_cache, value_cache, slot_mapping)
    if any(t.device != query.device for t in tensors):
        raise ValueError(f"all tensors must be on one device, got {[str(t.device) for t in tensors]}")


def rotary_write_kv(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply RoPE to query and key and store the rotated key and the value into the paged cache.

    ``query`` [num_tokens, num_heads, head_dim], ``key``/``value`` [num_tokens, num_kv_heads,
    head_dim] (any token and head strides, e.g. views of one fused QKV output); ``cos``/``sin``
    [num_tokens, 1, head_dim] as ``RotaryEmbedding`` returns them (rotate-half layout), in the
    query's dtype; caches [num_blocks, block_size, num_kv_heads, head_dim], written in place
    at the flat slots ``slot_mapping`` [num_tokens] (padding tokens may all name one slot of
    the null block). Returns ``(query_rotated, key_rotated)``, contiguous, in the query's dtype.
    """
    query = _heads_view(query, "query")
    key = _heads_view(key, "key")
    value = _heads_view(value, "value")
    _check_rotary_inputs(query, key, value, key_cache, value_cache, slot_mapping)
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    cos_rows = _angles_rows(cos, "cos", num_tokens, head_dim, query.dtype)  # [num_tokens, head_dim]
    sin_rows = _angles_rows(sin, "sin", num_tokens, head_dim, query.dtype)
    query_out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    key_out = torch.empty(key.shape, dtype=key.dtype, device=key.device)
    if num_tokens == 0:
        return query_out, key_out
    half = head_dim // 2
    block_heads = triton.next_power_of_2(num_heads)
    block_half = triton.next_power_of_2(half)
    _rotary_write_kv_kernel[(num_tokens,)](
        query,
        key,
        value,
        cos_rows,
        sin_rows,
        query_out,
        key_out,
        key_cache,
        value_cache,
        slot_mapping,
        num_heads,
        num_kv_heads,
        query.stride(0),
        query.stride(1),
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        cos_rows.stride(0),
        sin_rows.stride(0),
        HALF_DIM=half,
        BLOCK_HEADS=block_heads,
        BLOCK_KV_HEADS=triton.next_power_of_2(num_kv_heads),
        BLOCK_HALF=block_half,
        **launch.pdl(query.device),
        num_warps=max(1, min(8, block_heads * block_half // 1024)),
        enable_fp_fusion=False,
    )
    return query_out, key_out


@triton.jit
def silu_mul_rounded(gate, up):
    """``silu(gate) * up`` of loaded tiles, rounded to their dtype after silu and after the product, as torch does."""
    gate_f = gate.to(tl.float32)
    activation = tl.math.div_rn(gate_f, 1.0 + tl.exp(-gate_f)).to(gate.dtype)
    return (activation.to(tl.float32) * up.to(tl.float32)).to(up.dtype)


@triton.jit
def _silu_mul_kernel(
    gate_up_ptr, out_ptr, intermediate, stride_in, stride_out, BLOCK: tl.constexpr, USE_PDL: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < intermediate
    launch.wait_for_inputs(USE_PDL)
    gate = tl.load(gate_up_ptr + row * stride_in + offs, mask=mask, other=0.0)
    up = tl.load(gate_up_ptr + row * stride_in + intermediate + offs, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_out + offs, silu_mul_rounded(gate, up), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up`` [..., 2 * intermediate] (gate first), in one pass."""
    if gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up.shape={tuple(gate_up.shape)}: the last dimension must be even")
    rows = gate_up.reshape(-1, gate_up.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    intermediate = rows.shape[-1] // 2
    out = torch.empty(rows.shape[0], intermediate, dtype=rows.dtype, device=rows.device)
    if rows.shape[0]:
        block = 1024
        _silu_mul_kernel[(rows.shape[0], triton.cdiv(intermediate, block))](
            rows,
            out,
            intermediate,
            rows.stride(0),
            out.stride(0),
            BLOCK=block,
            **launch.pdl(rows.device),
            num_warps=4,
        )
    return out.reshape(*gate_up.shape[:-1], intermediate)

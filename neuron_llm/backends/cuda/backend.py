"""The cuda backend: the reference ops replaced by Triton kernels where a kernel pays.

Linears of 16-bit weights stay with cuBLAS (``F.linear``), which is at the bandwidth or
compute limit already, except a single row on Hopper: there the Triton GEMV overlaps the
kernel before it (programmatic dependent launch), which cuBLAS cannot. The KV-cache write is
folded into the RoPE kernel, and for a single row (16-bit, or int8 with a scale a row) both
into the Q/K/V GEMV and SwiGLU into the gate/up GEMV (into the down projection's loads for
int8 with group scales and a few rows), and the o and down GEMVs add the residual and store
what the gate/up and Q/K/V GEMVs after them need to norm their input themselves; the
activation quantization of an fp8 linear goes into the RMSNorm or SwiGLU before it. A long
prompt with no cached context goes to cuDNN's attention through SDPA, which is faster there
than our paged kernel (BENCHMARKS.md); everything else runs the Triton kernels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from neuron_llm.backends.cuda import argmax as split_argmax
from neuron_llm.backends.cuda import attention, fp8, fused, int8_matmul, launch, truncation, w8a8
from neuron_llm.backends.torch_backend import TorchBackend
from neuron_llm.backends.truncation import selection_bound
from neuron_llm.layers.linear import Linear
from neuron_llm.models.merge import merge_projections
from neuron_llm.quant.layers import Fp8Linear, Int8Linear, W8A8Linear

if TYPE_CHECKING:
    from neuron_llm.ops.metadata import AttentionMetadata


CUDNN_MIN_PROMPT = 1024
"""Shortest fresh prompt sent to cuDNN: below it, one paged launch for the batch wins."""
CUDNN_MAX_SEQS = 4
"""Most sequences of one step sent to cuDNN (one SDPA call each)."""
SWIGLU_INT8_MAX_ROWS = 1
"""Most tokens whose int8 down projection computes its SwiGLU input itself. Beyond one row the
16-row tiles' every column tile recomputes it: on an H200, 200 us for 5 or 16 rows against 29
for the plain product (BENCHMARKS.md), so the separate SwiGLU kernel runs first."""


_models_prepared = 0


def models_prepared() -> int:
    """Models this process has prepared for the cuda backend: after one, Triton holds the
    kernels it compiled in memory, and compiles (and writes to its cache) only new ones."""
    return _models_prepared


class CudaBackend(TorchBackend):
    name = "cuda"
    _stream_square_sums: tuple[torch.Tensor, torch.Tensor] | None = None
    """The residual stream the last one-row ``linear_residual`` returned whole, and its square sums."""

    def prepare_model(self, model: nn.Module) -> None:
        global _models_prepared
        _models_prepared += 1
        merge_projections(model)

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        # Few rows: split along the vocabulary, where torch's reduction leaves most of the GPU idle.
        if logits.is_cuda and split_argmax.takes(logits):
            return split_argmax.argmax(logits)
        return super().argmax(logits)

    def sample_argmax(self, logits: torch.Tensor, noise: torch.Tensor, is_greedy: torch.Tensor) -> torch.Tensor:
        # One pass over logits and noise, without the softmax's (argmax.py).
        if logits.is_cuda and split_argmax.takes_draw(logits, noise):
            return split_argmax.sample_argmax(logits, noise, is_greedy)
        return super().sample_argmax(logits, noise, is_greedy)

    def top_k_top_p(
        self,
        logits: torch.Tensor,
        top_k: torch.Tensor | None,
        top_p: torch.Tensor | None,
        top_k_bound: int | None = None,
    ) -> torch.Tensor:
        # Thresholds found without sorting every row: by bisection for top-p alone over many
        # rows, from torch.topk's selection for top-k in one kernel (the reference's torch
        # form launches some 35 small kernels).
        if truncation.takes(logits):
            if top_k is None and top_p is not None and logits.shape[0] >= truncation.MIN_ROWS:
                return truncation.top_p(logits, top_p)
            bound = selection_bound(logits, top_k, top_k_bound)
            if bound is not None:
                return truncation.top_k_top_p(logits, top_k, top_p, bound)
        return super().top_k_top_p(logits, top_k, top_p, top_k_bound)

    def swiglu_down(self, gate_up: torch.Tensor, down_proj: nn.Module) -> torch.Tensor:
        # Exact types: a row-parallel subclass all-reduces in its forward, which these paths skip.
        # The activation is quantized where it is made: one pass from gate/up to 8 bits.
        if type(down_proj) is Fp8Linear and down_proj.bias is None:
            x_fp8, x_scale = fp8.silu_mul_quantize_fp8(gate_up, None, down_proj.activation_scale_ub)
            out = fp8.fp8_scaled_mm(x_fp8, x_scale, down_proj.weight, down_proj.weight_scale, gate_up.dtype)
            return out.reshape(*gate_up.shape[:-1], down_proj.out_features)
        if type(down_proj) is W8A8Linear and down_proj.bias is None and w8a8.takes(down_proj.weight):
            x_q, x_scale = fp8.silu_mul_quantize_int8(gate_up)
            out = w8a8.int8_scaled_mm(x_q, x_scale, down_proj.weight, down_proj.weight_scale, gate_up.dtype)
            return out.reshape(*gate_up.shape[:-1], down_proj.out_features)
        # Few rows stream the weight: silu(gate) * up is made as the matmul loads it.
        if type(down_proj) is Int8Linear and gate_up.numel() <= SWIGLU_INT8_MAX_ROWS * gate_up.shape[-1]:
            return int8_matmul.int8_linear(
                gate_up,
                down_proj.weight,
                down_proj.weight_scale,
                down_proj.bias,
                down_proj.group_size,
                silu_mul_input=True,
            )
        if type(down_proj) is Linear and self._takes_gemv(gate_up, down_proj.weight):
            return int8_matmul.gemv_16bit(gate_up, down_proj.weight, down_proj.bias, silu_mul_input=True)
        return down_proj(fused.silu_mul(gate_up))

    def feed_forward(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        residual: torch.Tensor | None,
        gate_up_proj: nn.Module,
        down_proj: nn.Module,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # One row: the gate/up GEMV stores silu(gate) * up once per element and the down
        # projection streams a plain input; made in the down projection's loads, every column
        # tile recomputes it. Decode step (BENCHMARKS.md): bf16 -7% on an H200; int8 with a scale
        # per row -0.7% on an H100 since down takes 2048-deep tiles (+1-2% while it split K four
        # ways). int8 with group scales keeps the loads (not measured with its tiles).
        # Exact types: the GEMV skips the projection's forward; down_proj's own runs.
        if self._gemv_fuses(x, gate_up_proj):
            if norm := self._norm_input(x, weight, eps, residual):
                swiglu, residual = _gemv(x, gate_up_proj, silu_mul_output=True, norm=norm), x
            else:
                normed, residual = self.rms_norm(x, weight, eps, residual)
                swiglu = _gemv(normed, gate_up_proj, silu_mul_output=True)
            return self.linear_residual(swiglu, down_proj, residual)
        return super().feed_forward(x, weight, eps, residual, gate_up_proj, down_proj)

    def linear_residual(
        self, x: torch.Tensor, linear: nn.Module, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # One row (o and down projections): the GEMV adds the residual and stores the stream's
        # square sums, from which the GEMV after it norms the stream (``_norm_input``): no norm
        # kernel between them.
        if residual is None or not self._adds_residual(x, linear):
            return super().linear_residual(x, linear, residual)
        square_sums = int8_matmul.square_sums_buffer(residual)
        stream = _gemv(x, linear, residual=int8_matmul.ResidualAdd(residual, square_sums))
        self._stream_square_sums = (stream, square_sums)
        return stream, None

    def _adds_residual(self, x: torch.Tensor, proj: nn.Module) -> bool:
        """Whether the GEMV of ``proj`` adds the residual and stores its square sums (``int8_matmul.ResidualAdd``)."""
        return self._gemv_fuses(x, proj)

    def _norm_input(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
    ) -> int8_matmul.NormInput | None:
        """RMSNorm of ``x`` for the GEMV that reads it, where the GEMV that made ``x`` (the whole
        stream: no residual) stored its square sums; else None."""
        made, self._stream_square_sums = self._stream_square_sums, None
        if residual is not None or made is None or made[0] is not x:
            return None
        return int8_matmul.NormInput(weight, eps, made[1])

    def _gemv_fuses(self, x: torch.Tensor, proj: nn.Module) -> bool:
        """Whether the GEMV of ``proj`` takes the kernel after it into its stores (SwiGLU, RoPE): one
        row, of 16-bit weights where the GEMV takes them or of int8 ones with a scale a row."""
        if x.numel() != x.shape[-1]:
            return False
        if type(proj) is Int8Linear:
            return proj.group_size is None
        return type(proj) is Linear and self._takes_gemv(x, proj.weight)

    def norm_linear(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None, linear: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Exact type, as in swiglu_down: the norm's pass also quantizes the activations to fp8.
        # (A GEMV that made the norm as it loaded its input ran a decode step 3% slower on an
        # H200 than the norm kernel before it: BENCHMARKS.md.)
        if type(linear) is not Fp8Linear:
            return super().norm_linear(x, weight, eps, residual, linear)
        x_fp8, x_scale, new_residual = fp8.rms_norm_quantize_fp8(x, residual, weight, eps, linear.activation_scale_ub)
        out_dtype = torch.promote_types(x.dtype, weight.dtype)
        out = fp8.fp8_scaled_mm(x_fp8, x_scale, linear.weight, linear.weight_scale, out_dtype, linear.bias)
        return out.reshape(*x.shape[:-1], linear.out_features), x if new_residual is None else new_residual

    def norm_qkv_rotary(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        residual: torch.Tensor | None,
        qkv_proj: nn.Module,
        qkv_sizes: Sequence[int],
        head_dim: int,
        cos: torch.Tensor,
        sin: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # One row: the Q/K/V GEMV rotates Q and K and writes K and V to the cache as it stores,
        # in place of the RoPE kernel after it (BENCHMARKS.md). Exact types, as in feed_forward.
        if self._gemv_fuses(x, qkv_proj) and cos.dtype == x.dtype:
            rotary = int8_matmul.RotaryWrite(cos.reshape(-1), sin.reshape(-1), key_cache, value_cache, slot_mapping)
            if norm := self._norm_input(x, weight, eps, residual):
                return _gemv(x, qkv_proj, rotary=rotary, norm=norm).view(1, -1, head_dim), x
            normed, residual = self.rms_norm(x, weight, eps, residual)
            return _gemv(normed, qkv_proj, rotary=rotary).view(1, -1, head_dim), residual
        return super().norm_qkv_rotary(
            x, weight, eps, residual, qkv_proj, qkv_sizes, head_dim, cos, sin, key_cache, value_cache, slot_mapping
        )

    def paged_attention(
        self,
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        # Both kernels read only device tensors and launch from shapes alone, so a decode
        # step can be captured in a CUDA graph.
        if metadata.is_decode:
            return attention.decode_attention(query, key_cache, value_cache, metadata, scale)
        if _is_long_fresh_prefill(metadata, query.dtype):
            return _cudnn_prefill(query, key_cache, value_cache, metadata, scale)
        return attention.prefill_attention(query, key_cache, value_cache, metadata, scale)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self._takes_gemv(x, weight):
            return int8_matmul.gemv_16bit(x, weight, bias)
        return F.linear(x, weight, bias)

    @staticmethod
    def _takes_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
        """One row of a 16-bit weight's dtype (a batch-1 decode step) on Hopper or newer: the streaming
        GEMV starts loading its weight while the kernel before it ends (PDL); cuBLAS cannot."""
        return x.numel() == x.shape[-1] and x.dtype == weight.dtype != torch.float32 and launch.use_pdl(x.device)

    def int8_linear(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None,
        group_size: int | None,
    ) -> torch.Tensor:
        return int8_matmul.int8_linear(x, weight, weight_scale, bias, group_size)

    def fp8_linear(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None,
        activation_scale_ub: float | None,
    ) -> torch.Tensor:
        return fp8.fp8_linear(x, weight, weight_scale, bias, activation_scale_ub)

    def w8a8_linear(
        self, x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        return w8a8.w8a8_linear(x, weight, weight_scale, bias)

    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return fused.rms_norm(x, weight, eps), x
        return fused.fused_add_rms_norm(x, residual, weight, eps)

    def rotary_write_kv(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> torch.Tensor:
        query, _ = fused.rotary_write_kv(query, key, value, cos, sin, key_cache, value_cache, slot_mapping)
        return query


def _gemv(x: torch.Tensor, proj: nn.Module, **epilogue: Any) -> torch.Tensor:
    """The GEMV of a 16-bit or int8 projection (``CudaBackend._gemv_fuses``), with what it fuses."""
    if type(proj) is Linear:
        return int8_matmul.gemv_16bit(x, proj.weight, proj.bias, **epilogue)
    return int8_matmul.int8_linear(x, proj.weight, proj.weight_scale, proj.bias, proj.group_size, **epilogue)


def takes_whole_prompt(num_tokens: int, dtype: torch.dtype) -> bool:
    """Whether a whole prompt (no cached context) of ``num_tokens`` goes to cuDNN's attention."""
    return dtype != torch.float32 and num_tokens >= CUDNN_MIN_PROMPT


def _is_long_fresh_prefill(metadata: AttentionMetadata, dtype: torch.dtype) -> bool:
    """A few sequences, each a whole prompt that cuDNN takes (``takes_whole_prompt``)."""
    starts = metadata.query_start_loc_host
    real = [(starts[s + 1] - starts[s], n) for s, n in enumerate(metadata.seq_lens_host) if n > 0]
    return 0 < len(real) <= CUDNN_MAX_SEQS and all(q == n and takes_whole_prompt(n, dtype) for q, n in real)


def _cudnn_prefill(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Causal attention of each fresh prompt by cuDNN, over its keys and values read back from the pages.

    The prompts fill the first rows of the batch in order (``_is_long_fresh_prefill``); the
    padding rows after them are zeros. cuDNN reads grouped K/V heads itself (``enable_gqa``),
    and its output [1, heads, tokens, head_dim] lies in memory as [tokens, heads, head_dim]:
    one prompt without padding is returned as it is, with no copy.
    """
    block_size = key_cache.shape[1]
    starts = metadata.query_start_loc_host
    outputs = []
    for seq, seq_len in enumerate(metadata.seq_lens_host):
        if seq_len == 0:
            continue
        blocks = metadata.block_tables[seq, : -(-seq_len // block_size)]
        # [1, kv_heads, seq_len, head_dim]
        key, value = (cache[blocks].flatten(0, 1)[:seq_len].transpose(0, 1)[None] for cache in (key_cache, value_cache))
        start = starts[seq]
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]):
            out = F.scaled_dot_product_attention(
                query[start : start + seq_len].transpose(0, 1)[None],
                key,
                value,
                is_causal=True,
                scale=scale,
                enable_gqa=True,
            )
        outputs.append(out[0].transpose(0, 1))
    num_padding = query.shape[0] - sum(len(out) for out in outputs)
    if num_padding:
        outputs.append(query.new_zeros(num_padding, *query.shape[1:]))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

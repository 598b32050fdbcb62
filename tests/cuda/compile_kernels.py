"""Compile every Triton kernel of the cuda backend for Hopper (sm_90), with no GPU.

    TRITON_INTERPRET=0 python -m tests.cuda.compile_kernels

Triton's interpreter runs a kernel's Python and never compiles it, so a kernel the compiler
refuses passes every interpreted test. Here the public wrappers are called on CPU tensors
with Llama-3-8B shapes, Triton's active driver is replaced by one that only names an sm_90
target, and every launch becomes a warm-up: each kernel variant is compiled down to a cubin
(with the ptxas Triton ships) and nothing runs. Kernels are compiled as a Hopper GPU launches
them, with programmatic dependent launch. Prints the kernels compiled; exits non-zero
on the first compilation error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from unittest import mock

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver, jit

HOPPER = GPUTarget("cuda", 90, 32)
H100_SMS = 132


class CompileOnlyDriver:
    """The parts of a Triton driver that compiling a launch asks for."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return HOPPER

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


@contextlib.contextmanager
def compiling_only() -> Iterator[list[object]]:
    """Every Triton launch inside compiles its kernel for sm_90 (with PDL, as a Hopper GPU
    launches it) and runs nothing; yields the list the compiled kernels are appended to."""
    from neuron_llm.backends.cuda import launch

    compiled: list[object] = []
    run = jit.JITFunction.run

    def compile_only(self: jit.JITFunction, *args: object, grid: object, warmup: bool, **kwargs: object) -> object:
        compiled.append(run(self, *args, grid=grid, warmup=True, **kwargs))
        return compiled[-1]

    driver.set_active(CompileOnlyDriver())
    with mock.patch.object(jit.JITFunction, "run", compile_only), mock.patch.object(launch, "use_pdl", lambda d: True):
        yield compiled


def compile_every_kernel() -> list[str]:
    """Call each wrapper in the configurations the engine uses; return the kernels compiled."""
    from neuron_llm.backends.cuda import argmax, attention, fp8, fused, graphs, int8_matmul, truncation, w8a8
    from neuron_llm.ops.metadata import AttentionMetadata

    # Staged SwiGLU rows are dropped from L2 on a GPU (never on the CPU these tensors live on),
    # and launches are shaped for an H100's multiprocessors (splits of the context and of K).
    discards_l2 = mock.patch.object(fp8, "_discards_l2", lambda device: True)
    h100_attention = mock.patch.object(attention, "_num_sms", lambda device: H100_SMS)
    h100_matmul = mock.patch.object(int8_matmul, "_num_sms", lambda device: H100_SMS)
    with compiling_only() as compiled, discards_l2, h100_attention, h100_matmul:
        bf16 = torch.bfloat16
        hidden, intermediate, heads, kv_heads, head_dim, block = 4096, 14336, 32, 8, 128, 16
        for tokens in (1, 4096):
            x = torch.randn(tokens, hidden, dtype=bf16)
            weight = torch.randn(hidden, dtype=bf16)
            fused.rms_norm(x, weight, 1e-5)
            fused.fused_add_rms_norm(x, x.clone(), weight, 1e-5)
            fused.silu_mul(torch.randn(tokens, 2 * intermediate, dtype=bf16))
            fp8.quantize_fp8_per_token(x, 1200.0)
            fp8.quantize_fp8_per_token(torch.randn(tokens, 20000, dtype=bf16), None)  # the two-pass rows
            fp8.quantize_int8_per_token(x)
            fp8.silu_mul_quantize_fp8(torch.randn(tokens, 2 * intermediate, dtype=bf16))
            fp8.silu_mul_quantize_int8(torch.randn(tokens, 2 * intermediate, dtype=bf16))
            fp8.rms_norm_quantize_fp8(x, x.clone(), weight, 1e-5, 1200.0)
            w8a8.w8a8_linear(x, torch.zeros(1024, hidden, dtype=torch.int8), torch.ones(1024, 1))
            # Narrow GEMV tiles, group-scaled ones, and the wide tiles of qkv's 6144 rows.
            for rows, group_size in ((1024, None), (1024, 128), (6144, None)):
                q = torch.zeros(rows, hidden, dtype=torch.int8)
                scale = torch.ones(rows, 1 if group_size is None else hidden // group_size)
                config = int8_matmul.default_config(tokens, rows, hidden, group_size, H100_SMS)
                int8_matmul.int8_linear(x, q, scale, None, group_size, config=config)
            q = torch.zeros(hidden, intermediate, dtype=torch.int8)
            gate_up = torch.randn(tokens, 2 * intermediate, dtype=bf16)
            int8_matmul.int8_linear(gate_up, q, torch.ones(hidden, 1), silu_mul_input=True)
            int8_matmul.gemv_16bit(gate_up[:1], torch.zeros(hidden, intermediate, dtype=bf16), silu_mul_input=True)
            int8_matmul.gemv_16bit(x[:1], torch.zeros(1024, hidden, dtype=bf16))
            # A single row's gate/up GEMV storing silu(gate) * up, int8 and 16-bit.
            q = torch.zeros(2 * intermediate, hidden, dtype=torch.int8)
            int8_matmul.int8_linear(x[:1], q, torch.ones(2 * intermediate, 1), silu_mul_output=True)
            int8_matmul.gemv_16bit(x[:1], torch.zeros(2 * intermediate, hidden, dtype=bf16), silu_mul_output=True)
            # A single row's Q/K/V GEMV rotating Q and K and writing the cache, int8 and 16-bit.
            qkv_rows = (heads + 2 * kv_heads) * head_dim
            caches = [torch.zeros(4, block, kv_heads, head_dim, dtype=bf16) for _ in range(2)]
            angles = torch.ones(head_dim, dtype=bf16)
            rotary = int8_matmul.RotaryWrite(angles, angles, *caches, torch.zeros(1, dtype=torch.int64))
            q = torch.zeros(qkv_rows, hidden, dtype=torch.int8)
            int8_matmul.int8_linear(x[:1], q, torch.ones(qkv_rows, 1), rotary=rotary)
            int8_matmul.gemv_16bit(x[:1], torch.zeros(qkv_rows, hidden, dtype=bf16), rotary=rotary)
            # The down GEMV adding the residual, and the Q/K/V GEMV norming its input from its sums.
            square_sums = int8_matmul.square_sums_buffer(x[:1])
            residual = int8_matmul.ResidualAdd(x[:1].clone(), square_sums)
            norm = int8_matmul.NormInput(weight, 1e-5, square_sums)
            q_down = torch.zeros(hidden, intermediate, dtype=torch.int8)
            swiglu = torch.randn(1, intermediate, dtype=bf16)
            int8_matmul.int8_linear(swiglu, q_down, torch.ones(hidden, 1), residual=residual)
            int8_matmul.gemv_16bit(swiglu, torch.zeros(hidden, intermediate, dtype=bf16), residual=residual)
            int8_matmul.int8_linear(x[:1], q, torch.ones(qkv_rows, 1), rotary=rotary, norm=norm)
            int8_matmul.gemv_16bit(x[:1], torch.zeros(qkv_rows, hidden, dtype=bf16), rotary=rotary, norm=norm)
        # fp8 decode rows streaming the weight: the GEMV and the 16-row tiles, qkv and down.
        for tokens in (1, 5):
            for rows, width in ((6144, hidden), (hidden, intermediate)):
                x_fp8, x_scale = torch.zeros(tokens, width, dtype=fp8.FP8_DTYPE), torch.ones(tokens, 1)
                w_fp8 = torch.zeros(rows, width, dtype=fp8.FP8_DTYPE)
                int8_matmul.fp8_rows_matmul(x_fp8, x_scale, w_fp8, torch.ones(rows, 1), bf16)

            qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=bf16)
            query, key, value = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
            cos = torch.randn(tokens, head_dim, dtype=bf16)
            cache = torch.zeros(1 + -(-tokens // block) * 2, block, kv_heads, head_dim, dtype=bf16)
            slots = torch.arange(block, block + tokens)
            fused.rotary_write_kv(
                query.view(tokens, heads, head_dim),
                key.view(tokens, kv_heads, head_dim),
                value.view(tokens, kv_heads, head_dim),
                cos,
                cos.clone(),
                cache,
                cache.clone(),
                slots,
            )

        # Attention: a prefill of two prompts (one with cached context), and steps of few
        # queries over 8k contexts, with and without splitting the context.
        blocks_per_seq = 8192 // block
        tables = [list(range(1 + s * blocks_per_seq, 1 + (s + 1) * blocks_per_seq)) for s in range(2)]
        cache = torch.zeros(1 + 2 * blocks_per_seq, block, kv_heads, head_dim, dtype=bf16)
        # Both launch orders: keys and values that fit in L2, and 16k that do not.
        for seq_lens in ([300, 700], [8192, 8192]):
            prefill = AttentionMetadata.build([300, 200], seq_lens, tables, block, "cpu")
            attention.prefill_attention(torch.randn(500, heads, head_dim, dtype=bf16), cache, cache, prefill, 0.088)
        # Drafted tokens verified over an 8k context: the context split.
        verify = AttentionMetadata.build([5, 5], [8192, 5000], tables, block, "cpu", num_padded_tokens=16)
        attention.prefill_attention(torch.randn(16, heads, head_dim, dtype=bf16), cache, cache, verify, 0.088)
        decode = AttentionMetadata.build([1, 1], [8192, 5000], tables, block, "cpu")
        for num_splits in (1, 8):
            query = torch.randn(2, heads, head_dim, dtype=bf16)
            attention.decode_attention(query, cache, cache, decode, 0.088, num_splits=num_splits)

        # After the graph of a decode step: greedy argmax, then the next step's input ids.
        argmax.argmax(torch.randn(4, 128256))
        argmax.sample_argmax(torch.randn(64, 128256), torch.rand(64, 128256), torch.zeros(64, dtype=torch.bool))
        graphs._fill_placeholders_in_place(torch.zeros(64, dtype=torch.int64), torch.zeros(64, dtype=torch.int64))
        # Sampled rows with top-p, with top-k and with both.
        logits, top_k, top_p = torch.randn(8, 128256), torch.full((8,), 50), torch.full((8,), 0.9)
        truncation.top_p(logits, top_p)
        for top_p_or_none in (top_p, None):
            truncation.top_k_top_p(logits, top_k, top_p_or_none, 50)
    return [kernel.name for kernel in compiled]


if __name__ == "__main__":
    print("compiled:", " ".join(sorted(set(compile_every_kernel()))))

"""Argmax of rows of logits split along the vocabulary: greedy decoding, and the sampled draw.

PyTorch reduces one row of a 128k vocabulary in few programs, so a batch-1 greedy step waits
on a handful of multiprocessors streaming half a megabyte. Here each row is cut into chunks,
one program a chunk; each stores its chunk's best value and index, and the last program of
the row to finish (``launch.split_counters``) picks among them in chunk order. The result is
``torch.argmax``'s, the first index of the maximum, for rows without NaN (a NaN counts as +inf).

``sample_argmax`` draws sampled rows the same way in one pass: the reference's
``argmax(softmax(x) / noise)`` (exponential noise: each token wins with its probability) is
``argmax(x - log(noise))``, since the softmax's sum and exp preserve the order. That saves the
softmax's passes and its [rows, vocab] probabilities. Rounding differs, so a draw may differ
where two tokens' scores tie within it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from neuron_llm.backends.cuda import launch

MAX_ROWS = 16
"""Most rows taken here, the most measured (BENCHMARKS.md); more rows give torch's reduction
more programs of its own."""
CHUNK = 2048
"""Logits per program: 63 programs a row of Llama 3's vocabulary."""


@triton.jit
def _argmax_kernel(
    x_ptr, stride_x, noise_ptr, stride_noise, is_greedy_ptr, out_ptr, best_ptr, index_ptr, counter_ptr, n,
    NUM_CHUNKS: tl.constexpr, CHUNK: tl.constexpr, SAMPLE: tl.constexpr,
):  # fmt: skip
    """argmax of row ``x``; with SAMPLE, of ``x - log(noise)`` in rows that are not greedy."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    cols = chunk * CHUNK + tl.arange(0, CHUNK)
    values = tl.load(x_ptr + row * stride_x + cols, mask=cols < n, other=float("-inf")).to(tl.float32)
    if SAMPLE:
        if tl.load(is_greedy_ptr + row) == 0:
            values -= tl.log(tl.load(noise_ptr + row * stride_noise + cols, mask=cols < n, other=1.0))
    # NaN wins over finite values, as in torch; a +inf before it wins too (torch: the NaN).
    values = tl.where(values != values, float("inf"), values)
    best = tl.max(values, axis=0)
    # Columns past the row's end (loaded as -inf) never count, even in a row of -inf.
    index = tl.min(tl.where((values == best) & (cols < n), cols, n), axis=0)
    tl.store(best_ptr + row * NUM_CHUNKS + chunk, best)
    tl.store(index_ptr + row * NUM_CHUNKS + chunk, index)
    tl.debug_barrier()
    if tl.atomic_add(counter_ptr + row, 1, sem="acq_rel", scope="gpu") == NUM_CHUNKS - 1:
        chunks = tl.arange(0, triton.next_power_of_2(NUM_CHUNKS))
        bests = tl.load(best_ptr + row * NUM_CHUNKS + chunks, mask=chunks < NUM_CHUNKS, other=float("-inf"))
        indices = tl.load(index_ptr + row * NUM_CHUNKS + chunks, mask=chunks < NUM_CHUNKS, other=n)
        top = tl.max(bests, axis=0)
        tl.store(out_ptr + row, tl.min(tl.where(bests == top, indices, n), axis=0).to(tl.int64))
        tl.atomic_xchg(counter_ptr + row, 0, sem="relaxed", scope="gpu")


def takes(logits: torch.Tensor) -> bool:
    """Whether ``argmax`` takes these [rows, vocab] logits: a few contiguous rows of a dtype that
    float32 holds exactly."""
    return (
        logits.dim() == 2
        and 0 < logits.shape[0] <= MAX_ROWS
        and logits.stride(1) == 1
        and logits.dtype in (torch.float32, torch.bfloat16, torch.float16)
    )


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(dim=-1)`` of [rows, vocab] logits (``takes``), int64 [rows]."""
    if not takes(logits):
        raise ValueError(f"argmax takes 1..{MAX_ROWS} rows of contiguous logits, got {tuple(logits.shape)}")
    return _launch(logits, None, None)


def takes_draw(logits: torch.Tensor, noise: torch.Tensor) -> bool:
    """Whether ``sample_argmax`` takes these: fp32 [rows, vocab] logits and noise with contiguous rows."""
    return (
        logits.dim() == 2
        and noise.shape == logits.shape
        and logits.dtype == noise.dtype == torch.float32
        and logits.stride(1) == noise.stride(1) == 1
    )


def sample_argmax(logits: torch.Tensor, noise: torch.Tensor, is_greedy: torch.Tensor) -> torch.Tensor:
    """``Backend.sample_argmax`` (``takes_draw``; any number of rows): int64 [rows]."""
    if not takes_draw(logits, noise):
        raise ValueError(
            f"sample_argmax takes fp32 logits and noise of one shape [rows, vocab] with contiguous rows,"
            f" got {tuple(logits.shape)} and {tuple(noise.shape)}"
        )
    launch.check_per_row("is_greedy", is_greedy, logits.shape[0])
    return _launch(logits, noise, is_greedy)


def _launch(logits: torch.Tensor, noise: torch.Tensor | None, is_greedy: torch.Tensor | None) -> torch.Tensor:
    num_rows, vocab = logits.shape
    num_chunks = triton.cdiv(vocab, CHUNK)
    out = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    if num_rows == 0:
        return out
    best = torch.empty(num_rows, num_chunks, dtype=torch.float32, device=logits.device)
    index = torch.empty(num_rows, num_chunks, dtype=torch.int32, device=logits.device)
    counters = launch.split_counters(logits.device, num_rows)
    sample = noise is not None
    _argmax_kernel[(num_rows, num_chunks)](
        logits, logits.stride(0), noise if sample else logits, noise.stride(0) if sample else 0,
        is_greedy if sample else out, out, best, index, counters, vocab,
        NUM_CHUNKS=num_chunks, CHUNK=CHUNK, SAMPLE=sample, num_warps=8,
    )  # fmt: skip
    return out

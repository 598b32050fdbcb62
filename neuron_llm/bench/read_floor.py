"""The read floor: how fast any kernel reads a buffer of a given size, an anchor for streaming kernels.

A decode GEMV or decode attention reads each byte once, so the copy bandwidth (measured over
gigabytes) bounds it. At a few tens of megabytes a kernel's fixed costs (launch, the first
loads' latency, the last programs' tail) weigh too, and the copy bandwidth overstates what
is reachable. The read floor is the fastest of a few launch shapes of a kernel that only
XORs the buffer's words together: nothing a kernel reading those bytes could skip. Time it in the
same harness as the figure it anchors (same CUDA graph replay, same rotation of copies past
L2).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
import triton
import triton.language as tl

LAUNCH_SHAPES = tuple(itertools.product((4, 8), (4, 8, 16), (1, 2)))
"""(programs per multiprocessor, warps, 16-byte loads a thread per step), each timed; the best
is the floor. On an H200 they came within 0.4% of a sweep of 36 shapes, at 17-117 MB."""


@triton.jit
def _read_kernel(words_ptr, xors_ptr, num_words, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """XOR one CHUNK of int32 words together; the result is stored so that no load can be dropped."""
    start = tl.program_id(0).to(tl.int64) * CHUNK
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.int32)
    for step in range(0, CHUNK, BLOCK):
        index = start + step + offs
        acc ^= tl.load(words_ptr + index, mask=index < num_words, other=0)
    tl.store(xors_ptr + tl.program_id(0), tl.xor_sum(acc, axis=0))


def launches(buffers: list[torch.Tensor], num_sms: int) -> dict[str, tuple[Callable[[], None], torch.Tensor]]:
    """For each of ``LAUNCH_SHAPES``: a call that reads the next of ``buffers`` whole (cycling
    through them, all of one size), and the per-program XORs its launches store.

    ``buffers`` are contiguous tensors of the bytes to read; their size must be a multiple of 4.
    """
    num_bytes = buffers[0].numel() * buffers[0].element_size()
    if num_bytes % 4 or any(b.numel() * b.element_size() != num_bytes or not b.is_contiguous() for b in buffers):
        raise ValueError("buffers must be contiguous, all of one size, a multiple of 4 bytes")
    words = [b.view(torch.int32).reshape(-1) for b in buffers]
    num_words = num_bytes // 4
    calls = {}
    for programs_per_sm, num_warps, loads in LAUNCH_SHAPES:
        block = num_warps * 32 * 4 * loads  # 4 words a 16-byte load
        chunk = triton.cdiv(triton.cdiv(num_words, programs_per_sm * num_sms), block) * block
        grid = (triton.cdiv(num_words, chunk),)
        xors = torch.empty(grid[0], dtype=torch.int32, device=buffers[0].device)
        turn = itertools.cycle(words)

        def read(grid=grid, xors=xors, turn=turn, chunk=chunk, block=block, num_warps=num_warps) -> None:
            _read_kernel[grid](next(turn), xors, num_words, CHUNK=chunk, BLOCK=block, num_warps=num_warps)

        calls[f"{programs_per_sm} programs/SM, {num_warps} warps, {loads} loads"] = (read, xors)
    return calls


def read_floor(
    buffers: list[torch.Tensor], num_sms: int, time: Callable[[Callable[[], None]], float]
) -> tuple[float, str]:
    """The least time ``time`` gives over the launch shapes reading ``buffers``, and that shape."""
    times = {name: time(read) for name, (read, _) in launches(buffers, num_sms).items()}
    best = min(times, key=times.get)
    return times[best], best

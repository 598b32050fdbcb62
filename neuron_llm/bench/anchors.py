"""What the card can do, measured in the same run as the figures set beside it."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch


def time_cuda(fn: Callable[[], object], *, warmup: int = 3, repeats: int = 20) -> float:
    """Median seconds of ``fn`` on the current CUDA stream, timed with events after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def require_cuda(script: str) -> None:
    """Exit with a one-line message when no GPU is visible: ``script`` measures one."""
    if not torch.cuda.is_available():
        raise SystemExit(f"{script} measures a GPU: no CUDA device is visible")


def copy_bandwidth(device: torch.device | str = "cuda", num_bytes: int = 2 << 30) -> float:
    """Device-to-device copy rate in bytes/s, counting the bytes read plus the bytes written."""
    source = torch.randint(0, 255, (num_bytes,), dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    seconds = time_cuda(lambda: target.copy_(source))
    return 2 * num_bytes / seconds


def bf16_matmul_flops(device: torch.device | str = "cuda", size: int = 8192) -> float:
    """bf16 matmul rate in FLOP/s of a ``size``-cubed product on random data (never zeros)."""
    a = torch.randn(size, size, dtype=torch.bfloat16, device=device)
    b = torch.randn(size, size, dtype=torch.bfloat16, device=device)
    seconds = time_cuda(lambda: a @ b)
    return 2 * size**3 / seconds

"""The read floor's kernel reads every word of its buffer once, under each launch shape."""

from __future__ import annotations

import functools

import pytest
import torch

pytest.importorskip("triton")

from neuron_llm.bench.read_floor import launches, read_floor  # noqa: E402


def _xor_all(words: torch.Tensor) -> int:
    return functools.reduce(lambda a, b: a ^ b, words.view(torch.int32).tolist(), 0)


def test_each_launch_shape_reads_every_word_of_the_next_buffer(device: torch.device) -> None:
    generator = torch.Generator().manual_seed(0)
    # 1,237 words: no launch shape's chunk divides it, so the last program reads a partial chunk.
    buffers = [torch.randint(0, 256, (4 * 1237,), generator=generator, dtype=torch.uint8).to(device) for _ in range(2)]
    expected = [_xor_all(b.cpu()) for b in buffers]
    assert expected[0] != expected[1]
    for name, (read, xors) in launches(buffers, num_sms=2).items():
        for buffer_expected in expected:  # the calls cycle through the buffers
            read()
            assert _xor_all(xors.cpu()) == buffer_expected, name


def test_the_floor_is_the_fastest_launch_shape(device: torch.device) -> None:
    buffers = [torch.zeros(4096, dtype=torch.uint8, device=device)]
    names = list(launches(buffers, num_sms=2))
    times = iter(range(len(names), 0, -1))  # the last shape timed is the fastest
    assert read_floor(buffers, 2, lambda read: (read(), next(times))[1]) == (1, names[-1])


def test_buffers_of_other_sizes_are_refused(device: torch.device) -> None:
    with pytest.raises(ValueError, match="multiple of 4"):
        launches([torch.zeros(6, dtype=torch.uint8, device=device)], num_sms=2)
    with pytest.raises(ValueError, match="one size"):
        launches(
            [torch.zeros(8, dtype=torch.uint8, device=device), torch.zeros(12, dtype=torch.uint8, device=device)], 2
        )

"""On torch-xla's CPU device the neuron backend generates what the torch backend does on the CPU."""

from __future__ import annotations

import pytest

torch_xla = pytest.importorskip("torch_xla")

import torch

pytestmark = pytest.mark.xla

BUCKETS = [(4, 4), (16, 4)]
PROMPTS = [[3, 14, 15, 92, 65], [35, 89, 79, 32, 38, 46, 26, 43, 38, 32, 79], [50, 28, 8]]
# Chunked prefill: sequence 1's prompt spans two steps, sequence 2 joins in the second, then
# every sequence decodes. Lengths are odd and cross the 4-token block boundaries.
SCHEDULE = [[(0, 5), (1, 6)], [(1, 5), (0, 1), (2, 3)]]
NUM_DECODE_STEPS = 5


def run(make_driver, tiny_llama, on_xla: bool):
    driver = make_driver(tiny_llama(96), PROMPTS, BUCKETS, on_xla)
    logits = [driver.step(chunks) for chunks in SCHEDULE]
    for _ in range(NUM_DECODE_STEPS):
        logits.append(driver.step(driver.decode_all()))
    return driver.generated, logits


def test_greedy_tokens_and_logits_match_torch_backend(make_driver, tiny_llama) -> None:
    expected_tokens, expected_logits = run(make_driver, tiny_llama, on_xla=False)
    tokens, logits = run(make_driver, tiny_llama, on_xla=True)

    assert tokens == expected_tokens
    assert [len(t) for t in tokens] == [NUM_DECODE_STEPS + 2, NUM_DECODE_STEPS + 1, NUM_DECODE_STEPS + 1]
    for actual, expected in zip(logits, expected_logits):
        assert actual.dtype == torch.float32
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)

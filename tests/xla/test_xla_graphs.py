"""One compiled graph per bucket, none after warm-up, and exactly one execution per step."""

from __future__ import annotations

import pytest

torch_xla = pytest.importorskip("torch_xla")

import torch

from neuron_llm.compile.hlo_export import GraphShape, dummy_step
from neuron_llm.xla import count_graphs

pytestmark = pytest.mark.xla

BUCKETS = [(4, 4), (8, 4), (16, 4)]
MAX_BLOCKS_PER_SEQ = 8
# A vocabulary no other test module uses: graphs are cached per process by their shapes, so
# this model's graphs are compiled here first whatever ran before.
VOCAB_SIZE = 80
PROMPTS = [[5, 6, 7], [1] * 13, [9, 8], [2, 3, 4, 5, 6, 7, 8]]


def test_no_compilation_after_warm_up_and_one_execution_per_step(make_driver, tiny_llama) -> None:
    driver = make_driver(tiny_llama(VOCAB_SIZE), PROMPTS, BUCKETS, on_xla=True)
    with count_graphs() as warm_up:
        for num_tokens, num_seqs in BUCKETS:
            driver.run(dummy_step(GraphShape("warm-up", num_tokens, num_seqs, MAX_BLOCKS_PER_SEQ)))
    assert warm_up.compilations == len(BUCKETS)
    assert warm_up.executions == len(BUCKETS)

    # Real lengths vary from step to step; each pads to one of the warmed-up buckets.
    schedule = [
        [(0, 3)],
        [(1, 9), (0, 1)],
        [(1, 4), (2, 2), (3, 1)],
        [(3, 6), (0, 1), (2, 1)],
        driver.decode_all(),
        [(0, 1), (1, 1)],
        driver.decode_all(),
    ]
    with count_graphs() as serving:
        for chunks in schedule:
            with count_graphs() as step:
                logits = driver.step(chunks)
            assert step.executions == 1, f"step {chunks} ran {step.executions} graphs"
            assert torch.isfinite(logits).all()
    assert serving.compilations == 0
    assert all(len(tokens) >= 2 for tokens in driver.generated)


def test_tracing_a_step_runs_nothing_on_the_device(make_driver, tiny_llama) -> None:
    """No host read inside the forward: recording a whole step compiles and executes no graph."""
    driver = make_driver(tiny_llama(VOCAB_SIZE), PROMPTS, BUCKETS, on_xla=True)
    step = driver.plan([(0, 3), (1, 5)])
    with count_graphs() as tracing:
        logits = driver.worker.trace(step)
    assert (tracing.compilations, tracing.executions) == (0, 0)
    assert logits.shape == (4, VOCAB_SIZE)


def test_prompt_logprob_rows_take_one_more_graph_per_bucket(make_driver, tiny_llama) -> None:
    """Steps reading extra rows (prompt logprobs) share one padded graph, whatever their count."""
    xla = make_driver(tiny_llama(VOCAB_SIZE), PROMPTS, BUCKETS, on_xla=True)
    reference = make_driver(tiny_llama(VOCAB_SIZE), PROMPTS, BUCKETS, on_xla=False)
    first = xla.plan([(1, 13)])  # 16-token bucket
    first.logits_indices = first.logits_indices + list(range(12))
    second = xla.plan([(1, 9), (0, 3)])  # the same bucket, a different number of rows
    second.logits_indices = second.logits_indices + list(range(5))
    counts = []
    for step in (first, second):
        with count_graphs() as graphs:
            logits = xla.run(step)
        counts.append(graphs.compilations)
        torch.testing.assert_close(logits, reference.run(step), rtol=1e-4, atol=1e-4)
    assert counts[1] == 0

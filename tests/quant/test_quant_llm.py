"""Quantized models through the public API: ``LLM(quantization=...)``, ``LLM(model=quantized_dir)``, the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from neuron_llm import LLM, SamplingParams
from neuron_llm.backends.torch_backend import TorchBackend
from neuron_llm.cli import main
from neuron_llm.quant import QuantConfig, load_any_format, quantize_model, quantized_linears, save_quantized_checkpoint
from neuron_llm.quant.formats import FP8_DTYPE

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def make_llm(model: Path, **options: Any) -> LLM:
    return LLM(model=str(model), dtype="float32", num_kv_blocks=64, block_size=4, max_model_len=64, **options)


def save(loaded: Any, out: Path, source: Path) -> None:
    save_quantized_checkpoint(
        loaded.model, loaded.config, out, source=source, tokenizer=loaded.tokenizer, dtype=torch.float32
    )


def greedy_tokens(llm: LLM, prompt: list[int]) -> list[int]:
    return llm.generate({"prompt_token_ids": prompt}, GREEDY)[0].outputs[0].token_ids


@pytest.mark.parametrize("preset", ["int8", "int8-g128", "fp8", "fp8-all", "w8a8"])
def test_quantize_on_load_equals_loading_the_saved_checkpoint(
    quant_checkpoint: tuple[Any, Path], tmp_path: Path, prompt: list[int], preset: str
) -> None:
    _, path = quant_checkpoint
    on_load = make_llm(path, quantization=preset)
    model = on_load._executor.worker.model
    formats = quantized_linears(model)
    assert formats and {f.scheme for f in formats.values()} == {preset.split("-")[0]}

    reference = load_any_format(path, dtype=torch.float32, device="cpu", quantization=preset)
    save(reference, tmp_path / "q", path)
    from_dir = make_llm(tmp_path / "q")
    assert quantized_linears(from_dir._executor.worker.model) == formats
    assert from_dir.weight_bytes == on_load.weight_bytes
    assert greedy_tokens(from_dir, prompt) == greedy_tokens(on_load, prompt)


def test_weight_bytes_shrink_with_quantization(quant_checkpoint: tuple[Any, Path]) -> None:
    _, path = quant_checkpoint
    full = make_llm(path)
    int8 = make_llm(path, quantization="int8")
    model = int8._executor.worker.model
    int8_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert int8.weight_bytes == int8_bytes
    # Only the decoder linears shrink: 4 bytes -> 1 per weight, plus a float32 scale per row.
    linears = [p for name, p in full._executor.worker.model.named_parameters() if "layers." in name and "proj" in name]
    saved = sum(3 * p.numel() - 4 * p.shape[0] for p in linears)
    assert full.weight_bytes - int8.weight_bytes == saved


@pytest.mark.parametrize("tied", [False, True])
def test_a_decode_step_reads_one_row_of_an_untied_embedding(tied: bool) -> None:
    from neuron_llm.config import ModelConfig
    from neuron_llm.models.llama import LlamaForCausalLM

    config = ModelConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=tied,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    for parameter in model.parameters():
        torch.nn.init.normal_(parameter, std=0.02)
    model = model.to(torch.bfloat16)
    table_bytes = 100 * 32 * 2
    assert model.decode_read_bytes() == model.weight_bytes() - (0 if tied else table_bytes - 32 * 2)
    quantize_model(model, "int8-head")  # the head gets its own int8 copy: the table is read a row again
    assert model.decode_read_bytes() == model.weight_bytes() - (table_bytes - 32 * 2)


def test_quantized_matmuls_go_through_the_active_backend(quant_checkpoint: tuple[Any, Path], prompt: list[int]) -> None:
    class Counting(TorchBackend):
        def __init__(self) -> None:
            self.calls = {"int8": 0, "fp8": 0, "w8a8": 0}

        def int8_linear(self, *args: Any) -> torch.Tensor:
            self.calls["int8"] += 1
            return super().int8_linear(*args)

        def fp8_linear(self, *args: Any) -> torch.Tensor:
            self.calls["fp8"] += 1
            return super().fp8_linear(*args)

        def w8a8_linear(self, *args: Any) -> torch.Tensor:
            self.calls["w8a8"] += 1
            return super().w8a8_linear(*args)

    _, path = quant_checkpoint
    calls = {}
    for preset in ("fp8", "w8a8"):
        llm = make_llm(path, quantization=preset)
        backend = llm.engine.runner.executor.worker.backend = Counting()
        llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=2, ignore_eos=True))
        calls[preset] = backend.calls
    # Two steps each. The fp8 recipe quantizes the 3 feed-forward linears of the 2 inner
    # layers (of 4); w8a8 all 7 linears of all 4.
    assert calls["fp8"] == {"int8": 0, "fp8": 2 * 3 * 2, "w8a8": 0}
    assert calls["w8a8"] == {"int8": 0, "fp8": 0, "w8a8": 2 * 7 * 4}


def test_bad_quantization_options_are_refused(quant_checkpoint: tuple[Any, Path], tmp_path: Path) -> None:
    _, path = quant_checkpoint
    with pytest.raises(ValueError, match="quantization='int4'.*int8, int8-head, int8-g128, fp8, fp8-all, w8a8"):
        make_llm(path, quantization="int4")
    reference = load_any_format(path, dtype=torch.float32, device="cpu", quantization="int8")
    save(reference, tmp_path / "q", path)
    refused = r"already quantized \(compressed-tensors\): load it without quantization='fp8'"
    with pytest.raises(ValueError, match=refused):
        make_llm(tmp_path / "q", quantization=QuantConfig.for_scheme("fp8"))


def test_fp8_weights_are_stored_in_fp8(quant_checkpoint: tuple[Any, Path]) -> None:
    _, path = quant_checkpoint
    model = make_llm(path, quantization="fp8-all")._executor.worker.model
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == FP8_DTYPE
    assert model.lm_head.weight.dtype == torch.float32  # the LM head is never quantized


def test_cli_generate_quantized_reports_weight_bytes(
    quant_checkpoint: tuple[Any, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, path = quant_checkpoint
    sizes = {}
    for preset in (None, "int8"):
        args = ["generate", "w1 w2 w3", "--model", str(path), "--max-tokens", "3", "--num-kv-blocks", "32"]
        assert main(args + (["--quantization", preset] if preset else [])) == 0
        err = capsys.readouterr().err
        sizes[preset] = float(err.split("weights: ")[1].split(" MiB")[0])
    assert sizes["int8"] < 0.6 * sizes[None]

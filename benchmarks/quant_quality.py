"""Quality and memory of the quantized weight formats on the default model (SmolLM2-135M-Instruct).

    python benchmarks/quant_quality.py --max-tokens 6144 --context 1024 --stride 512

For each format: weight bytes, the quantized linears' bytes against 16-bit, sliding-window
perplexity on the first ``--max-tokens`` tokens of the corpus (WikiText-2 raw test, read from
../shared/data, never copied here), and greedy agreement with the unquantized model: the share
of identical tokens over ``--num-prompts`` continuations of ``--new-tokens`` tokens, each
prompt ``--prompt-tokens`` tokens cut from evenly spaced places in the corpus. The unquantized
model runs in ``--dtype`` (float32 on the CPU, where bf16 matmuls are slow); the quantized
ones run their activations in the same dtype. Prints a Markdown table and, with ``--json``,
writes the numbers.

``w8a8-sq<alpha>`` (e.g. ``w8a8-sq0.5``) is w8a8 after SmoothQuant with that migration
strength, calibrated on the last ``--calibration-tokens`` tokens of the corpus: text the
scored prefix does not contain (an overlap is refused), though a few greedy prompts do.

Two CPU cores score about 200 tokens a second per format at context 1024 (fewer for the
formats that quantize activations in every linear), so the defaults measure the first
6144 tokens; on a GPU (``--device cuda --dtype bfloat16``), raise ``--max-tokens`` to the whole corpus and
``--context`` to 2048.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from neuron_llm.config import parse_dtype
from neuron_llm.eval.agreement import greedy_continuations, mean_identical_prefix, token_agreement
from neuron_llm.eval.perplexity import perplexity
from neuron_llm.loader import load_model
from neuron_llm.models.llama import LlamaForCausalLM
from neuron_llm.quant import PRESETS, QuantConfig, quantize_model, quantized_weight_bytes
from neuron_llm.quant.formats import FP8_DTYPE
from neuron_llm.quant.smoothquant import activation_maxima, calibration_sequences, smooth_model

DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw-test.txt"
FORMATS: dict[str, QuantConfig] = {
    **PRESETS,
    # The Llama 3 policy without its activation bound: shows what the bound costs on this model.
    "fp8-unbounded": QuantConfig.for_scheme("fp8", activation_scale_ub=None),
}


SMOOTHQUANT_PREFIX = "w8a8-sq"


def format_names(value: str) -> list[str]:
    """The ``--formats`` list, each name checked: a ``FORMATS`` key or ``w8a8-sq<alpha>``."""
    names = [name.strip() for name in value.split(",") if name.strip()]
    for name in names:
        if name not in FORMATS and smoothquant_alpha(name) is None:
            raise SystemExit(
                f"--formats: unknown format {name!r}; known: {', '.join(FORMATS)} and {SMOOTHQUANT_PREFIX}<alpha>"
            )
    return names


def smoothquant_alpha(name: str) -> float | None:
    """The migration strength of ``w8a8-sq<alpha>``; None for another name, SystemExit for a bad alpha."""
    if not name.startswith(SMOOTHQUANT_PREFIX):
        return None
    alpha = name.removeprefix(SMOOTHQUANT_PREFIX)
    if not alpha.replace(".", "", 1).isdigit() or not 0.0 <= float(alpha) <= 1.0:
        raise SystemExit(f"{name}: name a migration strength in [0, 1], as in {SMOOTHQUANT_PREFIX}0.5")
    return float(alpha)


def quantized_copy(model: LlamaForCausalLM, name: str, calibration_ids: list[int]) -> LlamaForCausalLM:
    """A copy of ``model`` in format ``name``, checked by ``format_names``."""
    quantized = copy.deepcopy(model)
    alpha = smoothquant_alpha(name)
    if alpha is not None:
        sequences = calibration_sequences(calibration_ids, len(calibration_ids), 512)
        smooth_model(quantized, activation_maxima(quantized, sequences), alpha)
        name = "w8a8"
    quantize_model(quantized, FORMATS[name])
    return quantized


def deployed_weight_bytes(model: LlamaForCausalLM) -> int:
    """Weight bytes with every unquantized tensor in 16-bit, as the model would be served."""
    total = 0
    for name, param in model.named_parameters():
        is_stored_as_is = param.dtype in (torch.int8, FP8_DTYPE) or name.endswith(".weight_scale")
        total += param.numel() * (param.element_size() if is_stored_as_is else 2)
    return total


def evenly_spaced_prompts(token_ids: list[int], count: int, length: int) -> list[list[int]]:
    step = (len(token_ids) - length) // count
    return [token_ids[i * step : i * step + length] for i in range(count)]


def measure(
    name: str,
    model: LlamaForCausalLM,
    corpus_ids: list[int],
    prompts: list[list[int]],
    args: argparse.Namespace,
    reference: list[list[int]] | None,
) -> dict[str, Any]:
    start = time.perf_counter()
    result = perplexity(model, corpus_ids, context=args.context, stride=args.stride, show_progress=True)
    perplexity_s = time.perf_counter() - start
    start = time.perf_counter()
    continuations = greedy_continuations(model, prompts, args.new_tokens)
    reference = continuations if reference is None else reference
    greedy_s = time.perf_counter() - start
    sizes = quantized_weight_bytes(model)
    row = {
        "format": name,
        "weight_bytes_16bit": deployed_weight_bytes(model),
        "quantized_linear_ratio": sizes.ratio if sizes.quantized else None,
        "tokens_scored": result.num_tokens,
        "perplexity": result.perplexity,
        "greedy_agreement": token_agreement(reference, continuations),
        "identical_prefix": mean_identical_prefix(reference, continuations),
        "perplexity_seconds": round(perplexity_s, 1),
        "greedy_seconds": round(greedy_s, 1),
        "continuations": continuations,
    }
    print(json.dumps({k: v for k, v in row.items() if k != "continuations"}), flush=True)
    return row


def markdown_table(rows: list[dict[str, Any]]) -> str:
    base = rows[0]["perplexity"]
    lines = [
        (
            "| format | weight bytes (16-bit unquantized parts) | quantized linears vs 16-bit | perplexity | change "
            "| greedy agreement | identical prefix (mean tokens) |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        ratio = "-" if row["quantized_linear_ratio"] is None else f"{row['quantized_linear_ratio']:.1%}"
        change = (row["perplexity"] / base - 1) * 100
        lines.append(
            f"| {row['format']} | {row['weight_bytes_16bit'] / 2**20:.1f} MiB | {ratio} | {row['perplexity']:.4f} "
            f"| {change:+.2f}% | {row['greedy_agreement']:.1%} | {row['identical_prefix']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF directory or .gguf file (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--max-tokens", type=int, default=6144, help="corpus tokens scored for perplexity")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--stride", type=int, default=512)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument(
        "--formats",
        default="int8,fp8,fp8-unbounded,fp8-all",
        help=f"comma-separated, among {', '.join(FORMATS)} and {SMOOTHQUANT_PREFIX}<alpha>",
    )
    parser.add_argument("--calibration-tokens", type=int, default=32768, help="SmoothQuant: from the corpus's end")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu", help="cpu, cuda")
    parser.add_argument("--json", type=Path, default=None, help="write the rows (continuations included) here")
    args = parser.parse_args()
    # Checked before the baseline's minutes of scoring, not after.
    names = format_names(args.formats)
    for flag in ("calibration_tokens", "num_prompts", "prompt_tokens", "new_tokens"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')}={getattr(args, flag)}: must be at least 1")
    try:
        dtype = parse_dtype(args.dtype)
    except ValueError as e:
        raise SystemExit(str(e)) from None

    torch.manual_seed(0)
    loaded = load_model(args.model, dtype=dtype, device=args.device)
    assert loaded.tokenizer is not None
    all_ids = loaded.tokenizer(args.corpus.read_text(encoding="utf-8"), verbose=False)["input_ids"]
    corpus_ids = all_ids[: args.max_tokens]
    if len(all_ids) < args.num_prompts + args.prompt_tokens:
        raise SystemExit(f"the corpus's {len(all_ids)} tokens cannot hold --num-prompts distinct prompts")
    prompts = evenly_spaced_prompts(all_ids, args.num_prompts, args.prompt_tokens)
    calibration_ids = all_ids[-args.calibration_tokens :]
    smoothing = any(smoothquant_alpha(name) is not None for name in names)
    if smoothing and len(all_ids) - len(calibration_ids) < len(corpus_ids):
        raise SystemExit(
            "the calibration text would overlap the scored tokens: lower --max-tokens or --calibration-tokens"
        )
    print(f"model {loaded.source.name}, corpus {len(all_ids)} tokens, scoring {len(corpus_ids)}", flush=True)

    baseline = f"unquantized ({str(dtype).removeprefix('torch.')})"
    rows = [measure(baseline, loaded.model, corpus_ids, prompts, args, reference=None)]
    for name in names:
        model = quantized_copy(loaded.model, name, calibration_ids)
        rows.append(measure(name, model, corpus_ids, prompts, args, reference=rows[0]["continuations"]))
        del model

    print()
    if torch.device(args.device).type == "cuda":
        device = torch.cuda.get_device_name(args.device)
    else:
        device = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    print(f"device: {device}, torch {torch.__version__}")
    print(f"activations and unquantized weights in {args.dtype}; context {args.context}, stride {args.stride}")
    print(markdown_table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

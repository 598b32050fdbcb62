"""``neuron-llm quantize MODEL --scheme int8|fp8|w8a8 --out DIR``: write a compressed-tensors checkpoint.

Only ``argparse`` is imported up front, so that building the CLI's parser stays fast; torch,
transformers and the loaders are imported when the command runs.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from neuron_llm.help_format import DefaultsHelpFormatter
from neuron_llm.output_dir import check_out_dir

if TYPE_CHECKING:
    import torch

    from neuron_llm.loader import LoadedModel
    from neuron_llm.quant.config import QuantConfig

CALIBRATION_LENGTH = 512
DEFAULT_CALIBRATION_TOKENS = 32768


def add_quantize_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``quantize`` command to the CLI's subparsers."""
    parser = subparsers.add_parser(
        "quantize",
        help="write a quantized copy of a model (compressed-tensors layout)",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument(
        "model", nargs="?", default=None, help="HF directory or .gguf file (default: SmolLM2-135M-Instruct)"
    )
    parser.add_argument(
        "--scheme",
        choices=("int8", "fp8", "w8a8"),
        required=True,
        help="int8 weight-only, fp8 W8A8, or w8a8 (int8 weights and activations)",
    )
    parser.add_argument("--out", type=Path, required=True, help="new or empty directory to write")
    parser.add_argument(
        "--group-size", type=int, default=None, help="int8: one scale per N input features (default: per channel)"
    )
    parser.add_argument(
        "--modules",
        default=None,
        help="comma-separated linears to quantize (default: int8 and w8a8 all, fp8 gate_proj,up_proj,down_proj)",
    )
    parser.add_argument(
        "--skip-layers",
        default=None,
        help="comma-separated decoder layers kept 16-bit, -1 the last (default: int8 and w8a8 none, fp8 0,-1)",
    )
    parser.add_argument(
        "--lm-head",
        action="store_true",
        help="quantize the LM head too (untied from a tied embedding; default: kept 16-bit)",
    )
    parser.add_argument(
        "--activation-scale-ub",
        type=float,
        default=None,
        help="fp8: bound on a token's activation absolute maximum; 0 for none (default: 1200, as Llama 3)",
    )
    parser.add_argument(
        "--smoothquant",
        type=Path,
        default=None,
        metavar="TEXT_FILE",
        help="fp8/w8a8: first move activation outliers into the weights (SmoothQuant), calibrated on this text",
    )
    parser.add_argument(
        "--smoothquant-alpha", type=float, default=None, help="migration strength in [0, 1] (default: 0.5)"
    )
    parser.add_argument(
        "--calibration-tokens",
        type=int,
        default=None,
        help="tokens of the calibration text run, in sequences of 512 or the model's context (default: 32768)",
    )
    parser.add_argument("--dtype", default="bfloat16", help="dtype of the tensors left unquantized")
    parser.set_defaults(run=run_quantize)


def quant_config_from_args(args: argparse.Namespace) -> QuantConfig:
    """The recipe the ``quantize`` options describe: the scheme's defaults, overridden where given."""
    from neuron_llm.quant.config import QuantConfig
    from neuron_llm.quant.policy import QuantPolicy

    default = QuantConfig.for_scheme(args.scheme)
    policy = QuantPolicy(
        modules=_names(args.modules) if args.modules is not None else default.policy.modules,
        skip_layers=_layers(args.skip_layers) if args.skip_layers is not None else default.policy.skip_layers,
        lm_head=args.lm_head,
    )
    if args.activation_scale_ub is not None and args.scheme != "fp8":
        raise ValueError(f"--activation-scale-ub: only fp8 bounds its activations, not {args.scheme}")
    if args.activation_scale_ub is None:
        bound = default.format.activation_scale_ub
    elif not 0 <= args.activation_scale_ub < math.inf:  # NaN too
        raise ValueError(f"--activation-scale-ub {args.activation_scale_ub}: must be finite and >= 0 (0: no bound)")
    else:
        bound = args.activation_scale_ub if args.activation_scale_ub > 0 else None
    return QuantConfig.for_scheme(args.scheme, group_size=args.group_size, activation_scale_ub=bound, policy=policy)


def _names(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _layers(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(name) for name in _names(value))
    except ValueError:
        raise ValueError(f"--skip-layers {value!r}: must be comma-separated layer indices, such as 0,-1") from None


def run_quantize(args: argparse.Namespace) -> int:
    """Run ``quantize``: load, quantize, write ``--out``; return the exit code."""
    import torch

    from neuron_llm.config import parse_dtype
    from neuron_llm.quant.checkpoint import save_quantized_checkpoint
    from neuron_llm.quant.convert import quantize_model, quantized_weight_bytes
    from neuron_llm.quant.layers import quantized_linears
    from neuron_llm.quant.loading import load_any_format

    # Everything that can be checked is, before minutes of loading and quantizing.
    check_out_dir(args.out)
    config = quant_config_from_args(args)
    smoothing = smoothing_from_args(args)
    dtype = parse_dtype(args.dtype)
    check_quantizable(args.model, config, needs_tokenizer=smoothing is not None)
    if smoothing is None:
        # The quantizer computes in float32 whatever it is given: a 16-bit checkpoint loaded as
        # stored quantizes to the same bits in half the memory of a float32 copy.
        load_dtype = stored_dtype(args.model)
        loaded = load_any_format(args.model, dtype=load_dtype, device="cpu", quantization=config)
    else:
        # Calibration runs the model: in float32, where it was smoothed in.
        loaded = load_any_format(args.model, dtype=torch.float32, device="cpu")
        smooth(loaded, *smoothing)
        quantize_model(loaded.model, config)
    save_quantized_checkpoint(
        loaded.model,
        loaded.config,
        args.out,
        source=loaded.source,
        tokenizer=loaded.tokenizer,
        dtype=dtype,
    )
    num_quantized = len(quantized_linears(loaded.model))
    ratio = quantized_weight_bytes(loaded.model).ratio
    print(f"quantized {num_quantized} linears to {args.scheme} ({ratio:.1%} of their 16-bit bytes); wrote {args.out}")
    return 0


def stored_dtype(model: str | None) -> torch.dtype:
    """The dtype that holds ``model``'s weights as stored: their own, when every tensor of a
    safetensors directory is bf16, or every one fp16; float32 otherwise (GGUF's blocks, 32-bit
    or mixed files)."""
    import torch
    from safetensors import safe_open

    from neuron_llm.loader import resolve_model_path
    from neuron_llm.loader.hf_dir import find_weight_files

    path = resolve_model_path(model)
    if not path.is_dir():
        return torch.float32
    stored = set()
    for file in find_weight_files(path):
        with safe_open(str(file), framework="pt") as f:
            stored.update(f.get_slice(name).get_dtype() for name in f.keys())
    if len(stored) != 1:
        return torch.float32
    return {"BF16": torch.bfloat16, "F16": torch.float16}.get(stored.pop(), torch.float32)


def check_quantizable(model: str | None, config: QuantConfig, needs_tokenizer: bool = False) -> None:
    """Raise ``ValueError`` when ``model`` is already quantized, when ``config`` makes groups
    its checkpoint could not store, or when it has no tokenizer and ``needs_tokenizer`` (to
    read a calibration text); reads the model's config, not its weights."""
    import torch

    from neuron_llm.loader import load_model_info, resolve_model_path
    from neuron_llm.models.llama import LlamaForCausalLM
    from neuron_llm.quant.checkpoint import check_whole_groups, read_quantization_config

    path = resolve_model_path(model)
    if path.is_dir() and read_quantization_config(path) is not None:
        raise ValueError(f"{path} is already quantized (compressed-tensors); quantize its 16-bit original instead")
    info = load_model_info(path)
    if needs_tokenizer and info.tokenizer is None:
        raise ValueError(f"{path} has no tokenizer to read the calibration text with")
    with torch.device("meta"):  # shapes only
        skeleton = LlamaForCausalLM(info.config)
    for name in config.policy.select(skeleton, info.config.num_hidden_layers):
        check_whole_groups(name, skeleton.get_submodule(name).in_features, config.format.group_size)


def smoothing_from_args(args: argparse.Namespace) -> Smoothing | None:
    """The calibration text and settings of SmoothQuant, None without ``--smoothquant``; read and
    checked before the model loads."""
    from neuron_llm.quant.smoothquant import DEFAULT_ALPHA

    if args.smoothquant is None:
        given = [
            flag
            for flag, value in (
                ("--smoothquant-alpha", args.smoothquant_alpha),
                ("--calibration-tokens", args.calibration_tokens),
            )
            if value is not None
        ]
        if given:
            raise ValueError(f"{' and '.join(given)}: only used with --smoothquant TEXT_FILE")
        return None
    if args.scheme == "int8":
        raise ValueError("--smoothquant: int8 is weight-only; smoothing serves schemes that quantize activations")
    if args.smoothquant.is_dir():
        raise ValueError(f"--smoothquant {args.smoothquant} is a directory; name a calibration text file")
    if not args.smoothquant.exists():  # a pipe (<(...)) is no regular file, yet reads as one
        raise FileNotFoundError(f"--smoothquant {args.smoothquant}: no such calibration text file")
    try:
        text = args.smoothquant.read_text(encoding="utf-8-sig")  # a BOM is no text
    except UnicodeDecodeError as e:
        raise ValueError(f"--smoothquant {args.smoothquant} is not UTF-8 text: {e}") from e
    if not text.strip():
        raise ValueError(f"--smoothquant {args.smoothquant}: the calibration text is empty")
    alpha = DEFAULT_ALPHA if args.smoothquant_alpha is None else args.smoothquant_alpha
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"--smoothquant-alpha={alpha}: must be in [0, 1]")
    num_tokens = DEFAULT_CALIBRATION_TOKENS if args.calibration_tokens is None else args.calibration_tokens
    if num_tokens < 1:
        raise ValueError(f"--calibration-tokens={num_tokens}: must be at least 1")
    return Smoothing(args.smoothquant, text, alpha, num_tokens)


class Smoothing(NamedTuple):
    text_file: Path
    text: str
    alpha: float
    num_tokens: int


def smooth(loaded: LoadedModel, text_file: Path, text: str, alpha: float, num_tokens: int) -> None:
    """SmoothQuant ``loaded.model`` in place, calibrated on the first ``num_tokens`` tokens of
    ``text``, read from ``text_file``."""
    from neuron_llm.quant.smoothquant import activation_maxima, calibration_sequences, smooth_model

    assert loaded.tokenizer is not None, "check_quantizable refuses a model without one"
    ids = loaded.tokenizer(text, verbose=False)["input_ids"]
    # Positions past the model's context would calibrate on activations it never produces.
    sequences = calibration_sequences(ids, num_tokens, min(CALIBRATION_LENGTH, loaded.config.max_context_len))
    smooth_model(loaded.model, activation_maxima(loaded.model, sequences), alpha)
    print(f"smoothed with alpha {alpha} on {sum(len(s) for s in sequences)} tokens of {text_file}")

"""``neuron-llm eval perplexity MODEL --corpus FILE``: sliding-window perplexity from the command line.

Only ``argparse`` is imported up front, so that building the CLI's parser stays fast; torch,
transformers and the loaders are imported when the command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from neuron_llm.help_format import DefaultsHelpFormatter

DEFAULT_CONTEXT = 2048
"""Tokens per window unless --context says (or the model's context is shorter)."""
DEFAULT_STRIDE = 512
"""Tokens between window starts unless --stride says: a quarter of the default context."""


def add_eval_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``eval`` command (with its ``perplexity`` task) to the CLI's subparsers."""
    parser = subparsers.add_parser("eval", help="measure a model's quality")
    tasks = parser.add_subparsers(dest="task", required=True, metavar="TASK")
    ppl = tasks.add_parser(
        "perplexity",
        help="sliding-window perplexity over a text file",
        description="exp(mean negative log-likelihood, in nats, of the tokens scored), by Hugging Face's "
        'sliding windows ("Perplexity of fixed-length models"): each window scores the tokens the one '
        "before did not; the text's first token is never scored. The file is tokenized whole as read "
        "(CRLF as LF), with no BOS beyond what the tokenizer adds.",
        formatter_class=DefaultsHelpFormatter,
    )
    ppl.add_argument(
        "model", nargs="?", default=None, help="HF directory or .gguf file (default: SmolLM2-135M-Instruct)"
    )
    ppl.add_argument("--corpus", type=Path, required=True, help="UTF-8 text file to score")
    ppl.add_argument(
        "--context", type=int, default=None, help="tokens per window; default: 2048 or the model's context if shorter"
    )
    ppl.add_argument(
        "--stride",
        type=int,
        default=None,
        help="tokens between window starts (each scores the new ones); default: 512 or --context if shorter",
    )
    ppl.add_argument("--max-tokens", type=int, default=None, help="use only the first N tokens of the corpus")
    ppl.add_argument(
        "--quantization",
        default=None,
        help="quantize a 16-bit model on load: int8, int8-head, int8-g128, fp8, fp8-all or w8a8",
    )
    ppl.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    ppl.add_argument(
        "--dtype", default="auto", help="auto (float32 on CPU, bfloat16 elsewhere), float32, bfloat16, float16"
    )
    ppl.set_defaults(run=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    """Run ``eval perplexity``: print tokens scored, perplexity and weight bytes; return the exit code."""

    from neuron_llm.config import parse_device, resolve_dtype
    from neuron_llm.eval.perplexity import perplexity
    from neuron_llm.quant.convert import quantized_weight_bytes
    from neuron_llm.quant.loading import load_any_format

    if args.corpus.is_dir():
        raise ValueError(f"corpus {args.corpus} is a directory; name a text file")
    if not args.corpus.exists():  # a pipe (<(...)) is no regular file, yet reads as one
        raise FileNotFoundError(f"corpus {args.corpus} not found")
    if args.max_tokens is not None and args.max_tokens < 2:
        raise ValueError(f"--max-tokens {args.max_tokens}: at least 2 tokens are needed to score one")
    if args.context is not None and args.context < 2:
        raise ValueError(f"--context {args.context}: a window of at least 2 tokens is needed to score one")
    if args.stride is not None and args.stride < 1:
        raise ValueError(f"--stride {args.stride}: must be at least 1")
    if args.stride is not None and args.context is not None and args.stride > args.context:
        raise ValueError(f"--stride {args.stride}: must be in [1, --context {args.context}]")
    try:
        # utf-8-sig: a byte-order mark (Notepad writes one) is not text to score.
        text = args.corpus.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"corpus {args.corpus} is not UTF-8 text: {e}") from e
    if not text.strip():
        raise ValueError(f"corpus {args.corpus} holds no text")
    if parse_device(args.device).type not in ("cpu", "cuda"):
        raise ValueError(f"--device {args.device}: perplexity runs on cpu, cuda or cuda:N")
    dtype = resolve_dtype(args.dtype, args.device)
    loaded = load_any_format(args.model, dtype=dtype, device=args.device, quantization=args.quantization)
    if loaded.tokenizer is None:
        raise ValueError(f"{loaded.source} has no tokenizer, so a text corpus cannot be scored")
    limit = loaded.config.max_context_len
    if args.context is None:
        args.context = min(DEFAULT_CONTEXT, limit)
    elif args.context > limit:
        raise ValueError(f"--context {args.context} exceeds the model's context ({loaded.config.describe_context()})")
    if args.stride is None:
        args.stride = min(DEFAULT_STRIDE, args.context)
    elif args.stride > args.context:
        raise ValueError(f"--stride {args.stride}: must be in [1, --context {args.context}]")
    token_ids = loaded.tokenizer(text, verbose=False)["input_ids"]
    if args.max_tokens is not None:
        token_ids = token_ids[: args.max_tokens]
    result = perplexity(loaded.model, token_ids, context=args.context, stride=args.stride, show_progress=True)
    print(f"tokens scored: {result.num_tokens}")
    print(f"perplexity: {result.perplexity:.4f}")
    print(f"weight bytes: {loaded.weight_bytes}")
    quantized = quantized_weight_bytes(loaded.model)
    if quantized.quantized:
        print(f"quantized linears: {quantized.quantized} bytes, {quantized.ratio:.1%} of their 16-bit bytes")
    return 0

"""The ``neuron-llm`` command line."""

from __future__ import annotations

import argparse
import io
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from neuron_llm.bench.cli import add_bench_parser
from neuron_llm.eval.cli import add_eval_parser
from neuron_llm.help_format import DefaultsHelpFormatter
from neuron_llm.quant.cli import add_quantize_parser
from neuron_llm.sampling_params import SamplingParams
from neuron_llm.serve.cli import add_serve_parser


def _add_engine_arguments(parser: argparse.ArgumentParser, model_help: str) -> None:
    parser.add_argument("--model", default=None, help=f"{model_help} (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N, xla (Neuron) (default: cpu)")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    parser.add_argument(
        "--quantization",
        default=None,
        help="quantize on load: int8, int8-head, int8-g128, fp8 (Llama 3 recipe), fp8-all, w8a8",
    )
    parser.add_argument(
        "--tp",
        "--tensor-parallel-size",
        "-tp",
        type=int,
        default=None,
        help="tensor-parallel degree: devices, a process each on CPU/CUDA (default: 1)",
    )
    parser.add_argument(
        "--max-model-len", type=int, default=None, help="longest prompt + output in tokens (default: the model's)"
    )
    parser.add_argument("--num-kv-blocks", type=int, default=None, help="KV pool size in blocks (default: from memory)")
    parser.add_argument(
        "--speculative-config",
        default=None,
        help="speculative decoding as JSON, e.g. '{\"num_speculative_tokens\": 4}' (n-gram prompt lookup), "
        'or with "model": a draft model\'s path',
    )


def _add_compile_arguments(parser: argparse.ArgumentParser) -> None:
    """The options an artifact fixes beyond the shared ones (its buckets come from them)."""
    parser.add_argument("--out", required=True, help="new or empty directory to write the artifact to")
    parser.add_argument("--block-size", type=int, default=None, help="tokens per KV block (default: 16)")
    parser.add_argument("--max-num-seqs", type=int, default=None, help="most sequences in one step (default: 64)")
    parser.add_argument(
        "--max-num-batched-tokens", type=int, default=None, help="most tokens in one step (default: 2048)"
    )
    parser.add_argument(
        "--sampling-features",
        default=None,
        help="XLA device: comma-separated sampling features whose graphs every bucket compiles, in each "
        "combination: logit_bias, logprobs, min_tokens, penalties, prompt_logprobs (those the model's "
        "generation_config uses are added; a request using another compiles its graph when first served)",
    )
    parser.add_argument(
        "--context-buckets",
        default=None,
        help="XLA device: comma-separated context lengths block tables are padded to, max-model-len added; "
        "every bucket compiles at each (default: max-model-len / 4, / 16, / 64, none below 512)",
    )
    parser.add_argument(
        "--nki-kernels",
        default=None,
        help="XLA device on Neuron (SDK installed): comma-separated NKI kernels replacing their XLA forms: "
        "decode_attention, int8_matmul (not yet run on a NeuronCore)",
    )


def _run_compile(args: argparse.Namespace) -> int:
    from neuron_llm.compile.build import compile_artifact
    from neuron_llm.config import parse_context_buckets, parse_names, parse_sampling_features
    from neuron_llm.output_dir import check_out_dir

    check_out_dir(Path(args.out))

    options = {
        name: value
        for name, value in (
            ("block_size", args.block_size),
            ("max_num_seqs", args.max_num_seqs),
            ("max_num_batched_tokens", args.max_num_batched_tokens),
            ("num_kv_blocks", args.num_kv_blocks),
            ("speculative_config", args.speculative_config),
            (
                "sampling_features",
                None if args.sampling_features is None else parse_sampling_features(args.sampling_features),
            ),
            ("context_buckets", None if args.context_buckets is None else parse_context_buckets(args.context_buckets)),
            ("nki_kernels", None if args.nki_kernels is None else parse_names(args.nki_kernels)),
        )
        if value is not None
    }
    manifest = compile_artifact(
        args.model,
        args.out,
        dtype=args.dtype,
        device=args.device,
        quantization=args.quantization,
        tensor_parallel_size=args.tp,
        max_model_len=args.max_model_len,
        **options,
    )
    size = sum(record["bytes"] for record in manifest["weights"].values())
    print(
        f"{args.out}: {len(manifest['buckets'])} buckets, {len(manifest['weights'])} weight file(s) "
        f"({size / 2**20:.1f} MiB), {len(manifest['graphs'])} compiled graph file(s)"
    )
    return 0


def _run_verify(args: argparse.Namespace) -> int:
    from neuron_llm.compile.artifact import Artifact

    checked = Artifact.open(args.artifact).verify()
    print(f"{args.artifact}: {checked} file(s) match the manifest")
    return 0


def _add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=128, help="most tokens generated")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus: keep the most likely tokens up to this mass")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 keeps all")
    parser.add_argument("--min-p", type=float, default=0.0, help="drop tokens below this share of the top one's")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default, or -1: random)")
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="above 1 discourages tokens seen before")
    parser.add_argument("--ignore-eos", action="store_true", help="keep generating after EOS (to max-tokens)")


def _sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        seed=args.seed,
        stop=args.stop,
        repetition_penalty=args.repetition_penalty,
        ignore_eos=args.ignore_eos,
    )


def _run_generate(args: argparse.Namespace) -> int:
    from neuron_llm.llm import LLM
    from neuron_llm.loader import render_chat

    params = _sampling_params(args)
    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        quantization=args.quantization,
        tensor_parallel_size=args.tp,
        max_model_len=args.max_model_len,
        num_kv_blocks=args.num_kv_blocks,
        speculative_config=args.speculative_config,
    )
    print(f"weights: {llm.weight_bytes / 2**20:.1f} MiB", file=sys.stderr)
    try:
        if llm.tokenizer is None:
            raise ValueError(f"{args.model} has no tokenizer, so the text prompt cannot be encoded for it")
        prompt: str | dict[str, list[int]] = args.prompt
        if args.chat:
            if not llm.tokenizer.chat_template:
                raise ValueError("this model has no chat template: leave out --chat to send the prompt as written")
            text = render_chat(llm.tokenizer, [{"role": "user", "content": args.prompt}])
            prompt = {"prompt_token_ids": llm.tokenizer.encode(text, add_special_tokens=False)}
        if isinstance(sys.stdout, io.TextIOWrapper):
            # A terminal or file in a legacy encoding (cp1252, ASCII) shows what it can of the
            # text rather than ending the generation at its first emoji.
            sys.stdout.reconfigure(errors="replace")
        printed = 0
        for output in llm.stream(prompt, params):
            text = output.outputs[0].text
            sys.stdout.write(text[printed:])
            sys.stdout.flush()
            printed = len(text)
        sys.stdout.write("\n")
    finally:
        llm.shutdown()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neuron-llm", description="Llama inference for Neuron, GPUs and CPUs.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    generate = commands.add_parser(
        "generate", help="generate from a prompt, streaming to the terminal", formatter_class=DefaultsHelpFormatter
    )
    generate.add_argument("prompt")
    generate.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    _add_engine_arguments(generate, "HF directory, .gguf file or compiled artifact (whose options are the defaults)")
    _add_sampling_arguments(generate)
    generate.set_defaults(run=_run_generate)
    compile_ = commands.add_parser(
        "compile",
        help="build the engine once and write an artifact that loads without compiling",
        formatter_class=DefaultsHelpFormatter,
    )
    _add_engine_arguments(compile_, "HF directory or .gguf file")
    _add_compile_arguments(compile_)
    compile_.set_defaults(run=_run_compile)
    verify = commands.add_parser(
        "verify",
        help="hash every file of a compiled artifact against its manifest (loads check sizes and headers only)",
    )
    verify.add_argument("artifact", help="the artifact directory")
    verify.set_defaults(run=_run_verify)
    add_serve_parser(commands)
    add_quantize_parser(commands)
    add_eval_parser(commands)
    add_bench_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``neuron-llm`` console script."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # argparse would report them with the top-level usage; the command's own says what it takes.
        command = parser._subparsers._group_actions[0].choices[args.command]  # type: ignore[union-attr]
        command.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.run(args)
    except BrokenPipeError:
        # The reader left (`| head`): end quietly, as Unix tools do; stdout goes to devnull so
        # that the interpreter's last flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (ValueError, ImportError, OSError) as e:
        # Bad input or a missing piece of the environment (a file, torch-xla, an extra).
        print(f"neuron-llm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C: what was printed stands; a traceback of where it struck would say nothing.
        print(file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports it


if __name__ == "__main__":
    sys.exit(main())

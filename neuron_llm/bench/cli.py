"""``neuron-llm bench``: the engine's GPU figures beside their anchors, as JSON and a Markdown table."""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import platform
from pathlib import Path
from typing import Any

from neuron_llm.help_format import DefaultsHelpFormatter

CASES = ("decode", "batch", "sampling", "int8", "prefill", "speculative", "transformers")
SAMPLING_SETTINGS = {
    "top-p 0.9": {"temperature": 0.7, "top_p": 0.9},
    "top-k 50": {"temperature": 0.7, "top_k": 50},
    "top-k 50, top-p 0.9": {"temperature": 0.7, "top_k": 50, "top_p": 0.9},
}
"""The ``sampling`` case's settings, each timed beside greedy decoding of the same batch."""


def add_bench_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="GPU benchmarks of the engine beside their anchors (needs CUDA)",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument(
        "--cases",
        default=",".join(CASES),
        help=f"comma-separated among: {', '.join(CASES)}",
    )
    parser.add_argument("--num-layers", type=int, default=None, help="fewer layers than Llama-3-8B's 32 (quick runs)")
    parser.add_argument("--decode-tokens", type=int, default=128, help="tokens timed per decode run")
    parser.add_argument("--batch", type=int, default=64, help="sequences of the batch-throughput case")
    parser.add_argument("--prompt-len", type=int, default=128, help="prompt tokens before decoding")
    parser.add_argument("--prefill-len", type=int, default=4096, help="prompt tokens of the prefill case")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    parser.set_defaults(run=run_bench)


def bench_cases(value: str) -> set[str]:
    """The ``--cases`` named in ``value``; ``ValueError`` for a name that is not one."""
    cases = {c.strip() for c in value.split(",") if c.strip()}
    unknown = sorted(cases - set(CASES))
    if unknown or not cases:
        raise ValueError(f"--cases {value!r}: {unknown or 'none given'}; choose among {', '.join(CASES)}")
    return cases


def run_bench(args: argparse.Namespace) -> int:
    import torch  # here, not at the top: building the CLI's parser stays fast

    from neuron_llm.bench import anchors, engine
    from neuron_llm.config import CacheConfig

    cases = bench_cases(args.cases)
    if args.num_layers is not None and args.num_layers < 1:
        raise ValueError(f"--num-layers {args.num_layers}: must be >= 1")
    for flag in ("decode_tokens", "batch", "prompt_len", "prefill_len"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 1")
    if args.decode_tokens < 2:
        raise ValueError(f"--decode-tokens {args.decode_tokens}: must be >= 2, for a decode step after the prefill")
    # Checked before any case runs, not when the case that needs the room comes.
    limit = engine.EngineCase.max_model_len
    lengths = {
        "--prompt-len + 2 x --decode-tokens (the batch cases')": args.prompt_len + 2 * args.decode_tokens,
        "--prefill-len + 1": args.prefill_len + 1,
    }
    for what, length in lengths.items():
        if length > limit:
            raise ValueError(f"{what} = {length} exceeds the bench engine's max_model_len={limit}")
    # A batch case divides --batch by a decode step's time: every sequence must be in every step,
    # neither left waiting for a row nor preempted for KV blocks.
    if cases & {"batch", "sampling"}:
        case = engine.EngineCase
        if args.batch > case.max_num_seqs:
            raise ValueError(f"--batch {args.batch} exceeds the bench engine's max_num_seqs={case.max_num_seqs}")
        blocks = args.batch * -(-(args.prompt_len + 2 * args.decode_tokens) // CacheConfig.block_size)
        if blocks > case.num_kv_blocks - 1:
            raise ValueError(
                f"--batch {args.batch} sequences of --prompt-len + 2 x --decode-tokens tokens take {blocks} KV "
                f"blocks; the bench engine holds {case.num_kv_blocks - 1} of {CacheConfig.block_size} tokens"
            )
    if args.json is not None and not args.json.parent.is_dir():
        raise ValueError(f"--json {args.json}: the folder {args.json.parent} does not exist")
    if args.json is not None and args.json.is_dir():
        raise ValueError(f"--json {args.json} is a folder; name the file to write")
    if not torch.cuda.is_available():
        raise ValueError("neuron-llm bench measures a GPU: no CUDA device is visible")
    hf_config, model_config = engine.llama3_8b_shape(args.num_layers)
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model": f"Llama-3-8B shape, {model_config.num_hidden_layers} layers, random bf16 weights",
        "copy_bandwidth_Bps": anchors.copy_bandwidth(),
        "bf16_matmul_flops": anchors.bf16_matmul_flops(),
    }
    _print(results)

    def case(quantization: str | None = None) -> engine.EngineCase:
        return engine.EngineCase(engine.random_llama_builder(model_config, quantization), model_config)

    vocab = model_config.vocab_size
    decode = functools.partial(engine.decode_latency, prompt_len=args.prompt_len, max_tokens=args.decode_tokens)
    if cases & {"decode", "batch", "sampling", "prefill", "speculative"}:
        with engine.released():
            bf16 = case().engine()
            worker = bf16.runner.executor.worker
            results["weight_bytes"] = worker.weight_bytes
            results["decode_floor_s"] = worker.weight_bytes / results["copy_bandwidth_Bps"]
            # Issue 6 defines the floor by all the weights (16.06 GB), as gpt-fast's 1.14x is; a
            # step reads one row of the embedding table, so the bytes it reads give a lower one.
            results["decode_read_bytes"] = worker.decode_read_bytes
            results["decode_read_floor_s"] = worker.decode_read_bytes / results["copy_bandwidth_Bps"]
            del worker
            if "decode" in cases:
                results["bf16_decode"] = decode(bf16, vocab_size=vocab)
            if "batch" in cases:
                results["bf16_batch"] = engine.batch_throughput(
                    bf16, args.batch, args.prompt_len, args.decode_tokens * 2, vocab
                )
            if "sampling" in cases:
                batch = functools.partial(
                    engine.batch_throughput, bf16, args.batch, args.prompt_len, args.decode_tokens * 2, vocab
                )
                # An engine's first batch ran 3-20% slower than the next in every H200 run
                # (BENCHMARKS.md): not reported. Then greedy first and last, the sampled
                # settings between.
                batch()
                results["bf16_sampling"] = (
                    {"greedy": batch()}
                    | {name: batch(sampling=settings) for name, settings in SAMPLING_SETTINGS.items()}
                    | {"greedy, again": batch()}
                )
                results["bf16_sampling_b1"] = engine.sampled_decode(
                    bf16, args.prompt_len, args.decode_tokens, vocab, {"greedy": None, **SAMPLING_SETTINGS}
                )
            if "prefill" in cases:
                results["bf16_prefill"] = engine.prefill_time(bf16, args.prefill_len, vocab)
            if "speculative" in cases:
                results["bf16_speculative"] = engine.speculative_decode(
                    bf16, args.prompt_len, args.decode_tokens, vocab
                )
            _print(results)
            del bf16
    for preset in ("int8", "int8-head") if "int8" in cases else ():
        with engine.released():
            quantized = case(preset).engine()
            results[f"{preset}_decode"] = decode(quantized, vocab_size=vocab)
            results[f"{preset}_weight_bytes"] = quantized.runner.executor.worker.weight_bytes
            results[f"{preset}_decode_read_bytes"] = quantized.runner.executor.worker.decode_read_bytes
            if preset == "int8":
                results["int8_few_rows"] = engine.few_rows(quantized, args.prompt_len, args.decode_tokens, vocab)
            del quantized
    for preset in ("fp8", "fp8-all") if "prefill" in cases else ():
        with engine.released():
            quantized = case(preset).engine()
            results[f"{preset}_prefill"] = engine.prefill_time(quantized, args.prefill_len, vocab)
            del quantized
        _print(results)
    if "transformers" in cases:
        with engine.released():
            results["transformers_b1"] = engine.transformers_generate(hf_config, 1, args.prompt_len, args.decode_tokens)
        with engine.released():
            results["transformers_batch"] = engine.transformers_generate(
                hf_config, args.batch, args.prompt_len, args.decode_tokens * 2
            )
    _print(results)
    print(markdown_table(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


def _print(results: dict[str, Any]) -> None:
    print(json.dumps(results), flush=True)


def markdown_table(r: dict[str, Any]) -> str:
    """One row per figure, each with the anchor it is measured against."""
    rows = [
        ("copy bandwidth", f"{r['copy_bandwidth_Bps'] / 1e12:.2f} TB/s", "", ""),
        ("bf16 matmul 8192^3", f"{r['bf16_matmul_flops'] / 1e12:.0f} TFLOP/s", "", ""),
    ]
    floor, read_floor = r.get("decode_floor_s"), r.get("decode_read_floor_s")
    if floor:
        rows.append(("batch-1 decode floor", f"{floor * 1e3:.2f} ms/token", f"{r['weight_bytes'] / 1e9:.2f} GB", ""))
    if read_floor:
        read_gb = f"{r['decode_read_bytes'] / 1e9:.2f} GB read"
        rows.append(("batch-1 decode read floor", f"{read_floor * 1e3:.2f} ms/token", read_gb, ""))
    ours = r.get("bf16_decode", {}).get("decode_s_per_token")
    if ours and floor:
        rows.append(("bf16 decode, batch 1", f"{ours * 1e3:.2f} ms/token", "floor", f"{ours / floor:.2f}x"))
        if read_floor:
            rows.append(
                ("bf16 decode, batch 1", f"{ours * 1e3:.2f} ms/token", "read floor", f"{ours / read_floor:.2f}x")
            )
        model = r["bf16_decode"]["model_s_per_token"]
        rows.append(("bf16 decode step, worker only", f"{model * 1e3:.2f} ms/token", "floor", f"{model / floor:.2f}x"))
        sync = r["bf16_decode"].get("sync_s_per_token")
        if sync:
            rows.append(
                ("bf16 decode, async scheduling off", f"{sync * 1e3:.2f} ms/token", "floor", f"{sync / floor:.2f}x")
            )
    hf1 = r.get("transformers_b1", {}).get("decode_s_per_token")
    if ours and hf1:
        rows.append(("transformers eager, batch 1", f"{hf1 * 1e3:.2f} ms/token", "ours", f"{hf1 / ours:.2f}x slower"))
    int8 = r.get("int8_decode", {}).get("decode_s_per_token")
    if int8 and ours:
        rows.append(("int8 decode, batch 1", f"{int8 * 1e3:.2f} ms/token", "bf16 decode", f"{ours / int8:.2f}x faster"))
        int8_sync, bf16_sync = r["int8_decode"].get("sync_s_per_token"), r["bf16_decode"].get("sync_s_per_token")
        if int8_sync and bf16_sync:
            speedup = f"{bf16_sync / int8_sync:.2f}x faster"
            rows.append(("int8 decode, async scheduling off", f"{int8_sync * 1e3:.2f} ms/token", "bf16, off", speedup))
        int8_floor = r["int8_weight_bytes"] / r["copy_bandwidth_Bps"]
        rows.append(
            ("int8 decode floor", f"{int8_floor * 1e3:.2f} ms/token", "int8 decode", f"{int8 / int8_floor:.2f}x")
        )
        if "int8_decode_read_bytes" in r:
            int8_read = r["int8_decode_read_bytes"] / r["copy_bandwidth_Bps"]
            read_ratio = f"{int8 / int8_read:.2f}x"
            rows.append(("int8 decode read floor", f"{int8_read * 1e3:.2f} ms/token", "int8 decode", read_ratio))
    few = r.get("int8_few_rows")
    if few:
        ratio = f"{few['worker_step_ratio']:.2f}x the time"
        rows.append(("int8 verification step, batch 1, 5 tokens over 1", ratio, "int8 decode step", ""))
        if int8:
            # Decode steps against decode steps: the batch's whole run also holds its prefill.
            batch_rate = f"{few['decode_tokens_per_s'] * int8:.2f}x its tok/s, decode steps"
            tok_s = f"{few['output_tokens_per_s']:.0f} output tok/s ({few['decode_tokens_per_s']:.0f} in decode steps)"
            rows.append((f"int8 batch of {few['batch']}", tok_s, "int8 decode, batch 1", batch_rate))
    head = r.get("int8-head_decode", {}).get("decode_s_per_token")
    if head and ours:
        rows.append(
            (
                "int8 with an int8 LM head, batch 1",
                f"{head * 1e3:.2f} ms/token",
                "bf16 decode",
                f"{ours / head:.2f}x faster",
            )
        )
    batch = r.get("bf16_batch", {}).get("output_tokens_per_s")
    hf_batch = r.get("transformers_batch", {}).get("output_tokens_per_s")
    if batch:
        anchor = f"{batch / hf_batch:.2f}x transformers ({hf_batch:.0f})" if hf_batch else ""
        rows.append(("bf16 batch throughput", f"{batch:.0f} output tok/s", "transformers", anchor))
        sync = r["bf16_batch"].get("output_tokens_per_s_sync")
        if sync:
            ratio = f"{sync / hf_batch:.2f}x transformers" if hf_batch else ""
            rows.append(("bf16 batch, async scheduling off", f"{sync:.0f} output tok/s", "transformers", ratio))
    sampling = r.get("bf16_sampling", {})
    greedy = [sampling[run]["output_tokens_per_s"] for run in ("greedy", "greedy, again") if run in sampling]
    for name in [name for name in SAMPLING_SETTINGS if name in sampling]:
        sampled, anchor = sampling[name]["output_tokens_per_s"], sum(greedy) / len(greedy)
        runs = " and ".join(f"{g:.0f}" for g in greedy)
        rows.append(
            (f"bf16 batch, {name}", f"{sampled:.0f} output tok/s", f"greedy {runs}", f"{sampled / anchor:.2f}x")
        )
    decode = r.get("bf16_sampling_b1", {})
    for name in [name for name in SAMPLING_SETTINGS if name in decode]:
        sampled, anchor = (sum(decode[run]) / len(decode[run]) for run in (name, "greedy"))
        rows.append(
            (
                f"bf16 decode, batch 1, {name}",
                f"{sampled * 1e3:.2f} ms/token",
                f"greedy {anchor * 1e3:.2f} ms",
                f"{sampled / anchor:.2f}x",
            )
        )
    speculative = r.get("bf16_speculative", {})
    plain = speculative.get("plain", {}).get("s_per_token")
    for name, figures in speculative.items():
        if name in ("plain", "worker_step_ratio"):
            continue
        rows.append(
            (
                f"bf16 speculative decode, batch 1, {name}",
                f"{figures['s_per_token'] * 1e3:.2f} ms/token ({figures['decode_steps']} steps)",
                f"plain, async off {plain * 1e3:.2f} ms",
                f"{plain / figures['s_per_token']:.2f}x faster",
            )
        )
    for name, ratio in speculative.get("worker_step_ratio", {}).items():
        rows.append((f"bf16 verification step, batch 1, {name}", f"{ratio:.2f}x the time", "decode step", ""))
    prefill = r.get("bf16_prefill", {}).get("prefill_tokens_per_s")
    for preset in ("fp8", "fp8-all"):
        fp8 = r.get(f"{preset}_prefill", {}).get("prefill_tokens_per_s")
        if fp8 and prefill:
            rows.append((f"{preset} prefill", f"{fp8:.0f} tok/s", f"bf16 {prefill:.0f} tok/s", f"{fp8 / prefill:.2f}x"))
    lines = ["| figure | value | anchor | ratio |", "|---|---:|---|---:|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)

"""Throughput against latency on a GPU: our engine under Poisson load beside transformers' static batches.

    python benchmarks/throughput_latency.py --rates 1,2,4,8,16 --num-requests 64 \\
        --json throughput_latency.json --png benchmarks/results/throughput_latency.png

Our side: requests of ``--prompt-len`` random tokens arrive as a Poisson process at each rate
and are served by the engine in this process (continuous batching, CUDA graphs), as the
server's engine thread serves them, without the HTTP layer; each generates ``--output-len``
tokens. Reported per rate: output tokens/s over the run, and per request the time to first
token, time per output token after it (TPOT) and end-to-end latency. transformers' side:
``generate`` on static batches of the same requests (each batch waits for its slowest
member; no arrivals), at several batch sizes. The figure plots TPOT against throughput, as
the Llama 3 paper's latency/throughput figures do. ``--step-times`` also prints, per rate,
the median time from one step's launch to the next by kind and batch. Model: Llama-3-8B's
shape, random bf16 weights (``neuron_llm.bench.engine``).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from neuron_llm.bench import engine as bench
from neuron_llm.bench.anchors import require_cuda
from neuron_llm.sampling_params import SamplingParams


def traced_steps(llm_engine: Any) -> list[tuple[float, int, int]]:
    """Record (time, tokens, sequences) of every step the engine launches from now on."""
    log: list[tuple[float, int, int]] = []
    execute = llm_engine.runner.execute

    def traced(scheduled: Any, *args: Any, **kwargs: Any) -> Any:
        log.append((time.perf_counter(), scheduled.num_scheduled_tokens, len(scheduled.scheduled)))
        return execute(scheduled, *args, **kwargs)

    llm_engine.runner.execute = traced
    return log


def step_times(log: list[tuple[float, int, int]]) -> list[dict[str, Any]]:
    """Median time from one step's launch to the next's, by kind (decode or with a prefill) and batch."""
    gaps: dict[tuple[str, int], list[float]] = {}
    for (start, tokens, seqs), (end, _, _) in zip(log, log[1:]):
        gaps.setdefault(("decode" if tokens == seqs else "with prefill", seqs), []).append(end - start)
    return [
        {"step": kind, "sequences": seqs, "steps": len(times), "median_s": statistics.median(times)}
        for (kind, seqs), times in sorted(gaps.items())
    ]


def step_time_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| step | sequences | steps | median |", "|---|---:|---:|---:|"]
    lines += [f"| {r['step']} | {r['sequences']} | {r['steps']} | {r['median_s'] * 1e3:.2f} ms |" for r in rows]
    return "\n".join(lines)


def poisson_run(
    llm_engine: Any, rate: float, num_requests: int, prompt_len: int, output_len: int, seed: int
) -> dict[str, float]:
    rng = random.Random(seed)
    arrivals, now = [], 0.0
    for _ in range(num_requests):
        now += rng.expovariate(rate)
        arrivals.append(now)
    prompts = bench.random_prompts(num_requests, prompt_len, llm_engine.config.model.vocab_size, seed=seed)
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    first: dict[str, float] = {}
    done: dict[str, float] = {}
    start = time.perf_counter()
    submitted = 0
    while len(done) < num_requests:
        elapsed = time.perf_counter() - start
        while submitted < num_requests and arrivals[submitted] <= elapsed:
            llm_engine.add_request(prompts[submitted], params, request_id=str(submitted))
            submitted += 1
        if not llm_engine.has_unfinished_requests():
            time.sleep(max(0.0, arrivals[submitted] - elapsed))
            continue
        for output in llm_engine.step():
            t = time.perf_counter() - start
            first.setdefault(output.request_id, t)
            if output.finished:
                done[output.request_id] = t
    makespan = max(done.values())
    ids = [str(i) for i in range(num_requests)]
    ttft = [first[i] - arrivals[int(i)] for i in ids]
    tpot = [(done[i] - first[i]) / (output_len - 1) for i in ids]
    e2e = [done[i] - arrivals[int(i)] for i in ids]
    return {
        "rate": rate,
        "output_tokens_per_s": num_requests * output_len / makespan,
        "ttft_p50_s": statistics.median(ttft),
        "tpot_p50_s": statistics.median(tpot),
        "tpot_p90_s": bench.percentile(tpot, 90),
        "e2e_p50_s": statistics.median(e2e),
    }


def plot(ours: list[dict[str, float]], theirs: list[dict[str, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=110)
    ax.plot(
        [r["output_tokens_per_s"] for r in ours],
        [r["tpot_p50_s"] * 1e3 for r in ours],
        "o-",
        label="neuron-llm (Poisson)",
    )
    for r in ours:
        ax.annotate(f"{r['rate']:g}/s", (r["output_tokens_per_s"], r["tpot_p50_s"] * 1e3), fontsize=7)
    ax.plot(
        [r["output_tokens_per_s"] for r in theirs],
        [r["decode_s_per_token"] * 1e3 for r in theirs],
        "s--",
        label="transformers generate (static batches)",
    )
    for r in theirs:
        ax.annotate(f"b{r['batch']}", (r["output_tokens_per_s"], r["decode_s_per_token"] * 1e3), fontsize=7)
    ax.set_xlabel("output tokens/s (one GPU)")
    ax.set_ylabel("time per output token, p50 (ms)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="1,2,4,8,16")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--batches", default="1,8,32,64", help="transformers' static batch sizes")
    parser.add_argument("--num-layers", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--png", type=Path, default=None)
    parser.add_argument(
        "--step-times", action="store_true", help="record (JSON) and print each rate's step times by batch"
    )
    args = parser.parse_args()
    require_cuda("throughput_latency.py")
    if args.output_len < 2 or args.prompt_len + args.output_len > bench.EngineCase.max_model_len:
        # Each request must run its whole output_len (TPOT divides by output_len - 1), or tok/s overcounts.
        parser.error(f"--output-len >= 2 and --prompt-len + --output-len <= {bench.EngineCase.max_model_len}")

    hf_config, model_config = bench.llama3_8b_shape(args.num_layers)
    ours = []
    with bench.released():
        case = bench.EngineCase(lambda: bench.random_llama(model_config, torch.bfloat16, "cuda"), model_config)
        llm_engine = case.engine()
        log = traced_steps(llm_engine)
        rates = [float(r) for r in args.rates.split(",")]
        # Not reported: a kernel first met in a mixed step compiles here, not in the first rate's figures.
        poisson_run(llm_engine, rates[-1], 8, args.prompt_len, args.output_len, seed=len(rates))
        for i, rate in enumerate(rates):
            log.clear()
            ours.append(poisson_run(llm_engine, rate, args.num_requests, args.prompt_len, args.output_len, seed=i))
            if args.step_times:
                ours[-1]["step_times"] = step_times(log)
                print(step_time_table(ours[-1]["step_times"]), flush=True)
            print(json.dumps(ours[-1]), flush=True)
        del llm_engine
    theirs = []
    for batch in (int(b) for b in args.batches.split(",")):
        with bench.released():
            result = bench.transformers_generate(hf_config, batch, args.prompt_len, args.output_len)
        theirs.append({"batch": batch, **result})
        print(json.dumps(theirs[-1]), flush=True)
    title = (
        f"{torch.cuda.get_device_name()}, Llama-3-8B shape ({model_config.num_hidden_layers} layers), bf16, "
        f"{args.prompt_len} in / {args.output_len} out"
    )
    print("| side | load | output tok/s | TPOT p50 (ms) | TTFT p50 (ms) |\n|---|---|---:|---:|---:|")
    for r in ours:
        print(
            f"| neuron-llm | {r['rate']:g} req/s | {r['output_tokens_per_s']:.0f} | {r['tpot_p50_s'] * 1e3:.1f} "
            f"| {r['ttft_p50_s'] * 1e3:.0f} |"
        )
    for r in theirs:
        print(
            f"| transformers | batch {r['batch']} | {r['output_tokens_per_s']:.0f} "
            f"| {r['decode_s_per_token'] * 1e3:.1f} | - |"
        )
    if args.json:
        args.json.write_text(json.dumps({"title": title, "ours": ours, "transformers": theirs}, indent=1))
    if args.png:
        plot(ours, theirs, args.png, title)


if __name__ == "__main__":
    main()

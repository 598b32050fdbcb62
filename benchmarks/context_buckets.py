"""Decode steps per second on torch-xla's CPU device with context buckets and without, same run.

    PJRT_DEVICE=CPU .venv-xla/bin/python benchmarks/context_buckets.py

The neuron backend's attention computes every key of a step's block-table width. Without
context buckets that width is ``max_model_len``'s whatever the sequences hold; with them
(the default) it is the smallest context length holding the step's longest sequence. Both
engines run the default model (SmolLM2-135M-Instruct, fp32) with ``max_model_len`` 8,192 on
the same short prompts: a first pass compiles the graphs the workload uses, a second is
timed. Reports decode steps per second of each and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("PJRT_DEVICE", "CPU")


def _decode_steps_per_s(llm, prompts: list[list[int]], params) -> tuple[float, int]:
    """Decode steps per second over the whole batch once its prompts are in, and the widths used."""
    for prompt in prompts:
        llm.engine.add_request(prompt, params)
    widths = set()
    execute = llm.engine.runner.executor.execute_and_sample

    def recorded(step, *args, **kwargs):
        widths.add(step.max_blocks_per_seq)
        return execute(step, *args, **kwargs)

    llm.engine.runner.executor.execute_and_sample = recorded
    while llm.engine.scheduler.waiting:  # the prompts' prefill steps
        llm.engine.step()
    num_steps, start = 0, time.perf_counter()
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
        num_steps += 1
    elapsed = time.perf_counter() - start
    llm.engine.runner.executor.execute_and_sample = execute
    return num_steps / elapsed, max(widths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--num-seqs", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args()

    import torch_xla

    from neuron_llm import LLM, SamplingParams

    options = dict(
        device="xla",
        dtype="float32",
        warm_up=False,
        num_kv_blocks=-(-args.max_model_len // 16) + 1,  # a whole context, and the null block
        max_model_len=args.max_model_len,
        max_num_seqs=args.num_seqs,
        max_num_batched_tokens=args.num_seqs * args.prompt_len,
    )
    prompts = [[(7 * i + 13 * j) % 4000 + 100 for j in range(args.prompt_len)] for i in range(args.num_seqs)]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    results = {}
    for name, context_buckets in (("one_width", [args.max_model_len]), ("context_buckets", None)):
        llm = LLM(context_buckets=context_buckets, **options)
        _decode_steps_per_s(llm, prompts, params)  # compiles the workload's graphs
        steps_per_s, width = _decode_steps_per_s(llm, prompts, params)
        results[name] = {
            "decode_steps_per_s": round(steps_per_s, 2),
            "block_table_width": width,
            "context_tokens": width * llm.config.cache.block_size,
        }
    if results["context_buckets"]["block_table_width"] == results["one_width"]["block_table_width"]:
        raise SystemExit(
            f"the context buckets of --max-model-len {args.max_model_len} left the steps at the full width: "
            "nothing to compare (buckets start at 512 tokens; try 2048 or more)"
        )
    ratio = results["context_buckets"]["decode_steps_per_s"] / results["one_width"]["decode_steps_per_s"]
    print(json.dumps({"torch_xla": torch_xla.__version__, **results, "speedup": round(ratio, 2)}, indent=2))


if __name__ == "__main__":
    main()

"""Engine steps per second on torch-xla's CPU device beside the ``torch`` backend, same run.

    PJRT_DEVICE=CPU .venv-xla/bin/python benchmarks/xla_steps.py

Both run the default model (SmolLM2-135M-Instruct, fp32) through the same engine and
buckets; the XLA side first compiles one graph per bucket (the warm-up), and then the same
workload runs on each. Reports buckets, graphs compiled, compile time and steps per second.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("PJRT_DEVICE", "CPU")


def _run(llm, prompts: list[str], params) -> tuple[int, float]:
    """Steps and seconds to finish every prompt, all submitted at once."""
    for prompt in prompts:
        llm.engine.add_request(prompt, params)
    num_steps = 0
    start = time.perf_counter()
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
        num_steps += 1
    return num_steps, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-num-seqs", type=int, default=4)
    parser.add_argument("--max-num-batched-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()

    import torch_xla

    from neuron_llm import LLM, SamplingParams

    options = dict(
        dtype="float32",
        num_kv_blocks=128,
        max_model_len=256,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )
    prompts = [
        "The history of the city of London begins",
        "def quicksort(items):",
        "Photosynthesis is the process by which",
        "Once upon a time, in a small village,",
        "The three laws of thermodynamics state",
        "In 1969, the first humans landed on",
        "A good cup of coffee needs",
        "The Pacific Ocean is",
    ]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)

    start = time.perf_counter()
    xla = LLM(device="xla", warm_up=False, **options)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    num_graphs = xla.engine.runner.warm_up()
    compile_s = time.perf_counter() - start
    xla_steps, xla_s = _run(xla, prompts, params)
    cpu = LLM(device="cpu", **options)
    cpu_steps, cpu_s = _run(cpu, prompts, params)
    print(
        json.dumps(
            {
                "torch_xla": torch_xla.__version__,
                "buckets": [b.name for b in xla.engine.runner.buckets.all],
                "graphs_compiled_in_warm_up": num_graphs,
                "graphs_compiled_after_workload": xla.engine.stats().num_compiled_graphs,
                "load_s": round(load_s, 1),
                "warm_up_compile_s": round(compile_s, 1),
                "xla_steps_per_s": round(xla_steps / xla_s, 2),
                "torch_cpu_steps_per_s": round(cpu_steps / cpu_s, 2),
                "steps": [xla_steps, cpu_steps],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()

"""Batch-1 generate speed of the default model: neuron-llm beside transformers, same run.

    python benchmarks/cpu_generate.py --new-tokens 128 --repeats 3

Both generate greedily with EOS ignored, from the same prompt, on the same threads; runs
alternate between the two and the median is reported as output tokens per second, first
token included.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch


def _median_times(fns: list, repeats: int) -> list[float]:
    """Median wall time of each function; repeats alternate between them so load drifts hit both."""
    for fn in fns:
        fn()  # warm-up
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, fn_times in zip(fns, times):
            start = time.perf_counter()
            fn()
            fn_times.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prompt", default="The history of the city of London begins")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from neuron_llm import LLM, SamplingParams
    from neuron_llm.loader.default_model import default_model_path

    llm = LLM(dtype=args.dtype)
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)

    path = default_model_path()
    hf = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=getattr(torch, args.dtype)
    ).eval()
    ids = llm.tokenizer(args.prompt, return_tensors="pt").input_ids

    def hf_generate() -> None:
        with torch.inference_mode():
            hf.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)

    ours, theirs = _median_times([lambda: llm.generate([args.prompt], params), hf_generate], args.repeats)
    result = {
        "device": f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "new_tokens": args.new_tokens,
        "neuron_llm_tok_per_s": round(args.new_tokens / ours, 2),
        "transformers_tok_per_s": round(args.new_tokens / theirs, 2),
        "ratio": round(theirs / ours, 3),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Offline throughput of ``LLM.generate``: prompts batched by the engine beside the same prompts one at a time.

    python benchmarks/offline_throughput.py --num-prompts 64 --max-tokens 32

Prompts are the first paragraphs of the WikiText-2 test split (read from ../shared/data,
never copied), cut to at most ``--prompt-tokens`` tokens. Generation is greedy with EOS
ignored, so both runs produce exactly the same number of tokens.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

DEFAULT_CORPUS = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "wikitext-2-raw-test.txt"


def wikitext_prompts(path: Path, tokenizer, count: int, max_tokens: int) -> list[list[int]]:
    """The first ``count`` paragraphs of at least 16 tokens, each cut to ``max_tokens`` tokens."""
    prompts = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("="):
            continue
        ids = tokenizer.encode(line)[:max_tokens]
        if len(ids) >= 16:
            prompts.append(ids)
        if len(prompts) == count:
            break
    return prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    from neuron_llm import LLM, SamplingParams

    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=512)
    prompts = wikitext_prompts(args.corpus, llm.tokenizer, args.num_prompts, args.prompt_tokens)
    inputs = [{"prompt_token_ids": ids} for ids in prompts]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(inputs[:2], params)  # warm-up

    start = time.perf_counter()
    batched = llm.generate(inputs, params)
    batched_s = time.perf_counter() - start
    start = time.perf_counter()
    serial = [llm.generate(prompt, params)[0] for prompt in inputs]
    serial_s = time.perf_counter() - start

    num_output = sum(len(o.outputs[0].token_ids) for o in batched)
    same = sum(a.outputs[0].token_ids == b.outputs[0].token_ids for a, b in zip(batched, serial))
    print(
        json.dumps(
            {
                "device": f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)",
                "torch": torch.__version__,
                "num_prompts": len(prompts),
                "prompt_tokens_mean": round(sum(map(len, prompts)) / len(prompts), 1),
                "output_tokens": num_output,
                "batched_tok_per_s": round(num_output / batched_s, 1),
                "one_at_a_time_tok_per_s": round(num_output / serial_s, 1),
                "speedup": round(serial_s / batched_s, 2),
                "identical_outputs": f"{same}/{len(prompts)}",
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()

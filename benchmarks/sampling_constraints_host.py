"""Host time the sampling constraints add to a step: each row's masks and bias, built for the sampler.

    python benchmarks/sampling_constraints_host.py --batch 32

The engine builds a ``SamplingBatch`` on the host before every step; logit_bias,
allowed_token_ids, bad_words and structured outputs each add to it (a grammar also asks its
matcher for the next token mask, in ``LLMEngine._row_state``). For ``--batch`` rows over the
default model's vocabulary (SmolLM2's, 49,152 tokens; bad words and grammars need its
tokenizer), this times, per setting, the median of 50 builds of the rows and the batch on
the CPU with one thread, beside the anchor measured in the same run: the same build for
plain greedy rows, and ``process_logits`` applying the resulting bias to a step's logits.
It also times the engine's check that a row leaves some token to sample
(``RowState.forbids_every_token``, run for each row with bad words or a grammar).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from neuron_llm.loader import load_model_info, resolve_model_path
from neuron_llm.loader.tokenizer import bad_word_token_ids
from neuron_llm.sample.sampler import RowState, SamplingBatch, process_logits
from neuron_llm.sample.structured import GrammarCompiler
from neuron_llm.sampling_params import MAX_LOGIT_BIAS, SamplingParams, StructuredOutputsParams

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "tags": {"type": "array"}},
    "required": ["name", "age"],
}
REPEATS = 50


def median_ms(build: Callable[[], object]) -> float:
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        build()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    info = load_model_info(resolve_model_path(None))
    tokenizer, vocab = info.tokenizer, info.config.vocab_size
    greedy = SamplingParams(temperature=0.0)
    words = ["the", "very", "however", "really", "just", "actually", "basically", "literally"]
    compiler = GrammarCompiler(tokenizer, vocab, [tokenizer.eos_token_id])
    structure = StructuredOutputsParams(json=SCHEMA)
    prompt = tokenizer.encode("Give me a person as JSON.")
    output = tokenizer.encode('{"name": "Ann", "age"')  # partway through the schema, as mid-generation

    # What a step does per row is timed, not what a request does once (compiling, tokenizing).
    grammars = [compiler.matcher(structure) for _ in range(args.batch)]
    for grammar in grammars:
        for token in output:
            grammar.accept(token)  # raises if the schema refuses it
    spellings = bad_word_token_ids(tokenizer, words)
    biased = SamplingParams(temperature=0.0, logit_bias=dict.fromkeys(range(MAX_LOGIT_BIAS), 1.0))
    allowed = SamplingParams(temperature=0.0, allowed_token_ids=list(range(vocab - 1)))

    cases: dict[str, Callable[[], list[RowState]]] = {
        "plain greedy (anchor)": lambda: [RowState(greedy, prompt, output) for _ in range(args.batch)],
        f"logit_bias, {MAX_LOGIT_BIAS} ids (its cap)": lambda: [
            RowState(biased, prompt, output) for _ in range(args.batch)
        ],
        "allowed_token_ids, all but one": lambda: [RowState(allowed, prompt, output) for _ in range(args.batch)],
        "bad_words, 8 words": lambda: [RowState(greedy, prompt, output, None, spellings) for _ in range(args.batch)],
        "JSON schema (its mask, then the bias)": lambda: [
            RowState(greedy, prompt, output, None, (), grammar.allowed()) for grammar in grammars
        ],
    }
    logits = torch.randn(args.batch, vocab)
    print(f"{args.batch} rows, vocabulary {vocab}, CPU, one thread; median of {REPEATS} builds\n")
    print("| rows of | build (ms) | x plain | process_logits with it (ms) | no-token-left check (ms) |")
    print("|---|---:|---:|---:|---:|")
    plain_ms = None
    eos = [tokenizer.eos_token_id]
    for name, rows in cases.items():
        built = median_ms(lambda rows=rows: SamplingBatch.build(rows(), vocab, "cpu"))
        batch = SamplingBatch.build(rows(), vocab, "cpu")
        applied = median_ms(lambda batch=batch: process_logits(logits, batch))
        made = rows()
        checked = median_ms(lambda made=made: [row.forbids_every_token(vocab, eos) for row in made])
        plain_ms = plain_ms or built
        print(f"| {name} | {built:.2f} | {built / plain_ms:.1f} | {applied:.2f} | {checked:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

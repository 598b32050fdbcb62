"""Host time of n-gram prompt lookup per engine step: one proposal for each running sequence.

    python benchmarks/ngram_lookup.py --num-seqs 64 --length 2000 --vocab 50000,200

Random token sequences (a large vocabulary: few earlier occurrences of the last token; a
small one: many), each gaining a token a step; the best of ``--repeats`` steps, reading the
tokens from each request's list and from its NumPy array (``Request.token_array()``, what
the engine passes). A step of the engine proposes for every running sequence before it
launches, so this time is added to each decode step on the host.
"""

from __future__ import annotations

import argparse
import random
import time

from neuron_llm.config import SpeculativeConfig
from neuron_llm.engine import Request
from neuron_llm.engine.speculative.ngram import NgramProposer
from neuron_llm.sampling_params import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-seqs", type=int, default=64)
    parser.add_argument("--length", type=int, default=2000)
    parser.add_argument("--vocab", default="50000,200", help="comma-separated vocabulary sizes")
    parser.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    proposer = NgramProposer(SpeculativeConfig(num_speculative_tokens=args.k))
    for vocab in map(int, args.vocab.split(",")):
        rng = random.Random(0)
        prompts = [[rng.randrange(vocab) for _ in range(args.length)] for _ in range(args.num_seqs)]
        requests = [Request(str(i), prompt, SamplingParams()) for i, prompt in enumerate(prompts)]
        sources = {
            "list": lambda request: request.all_token_ids,
            "request's array": lambda request: request.token_array(),
        }
        for name, tokens_of in sources.items():
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                for request in requests:
                    proposer.propose(tokens_of(request))
                times.append(time.perf_counter() - start)
                # As a decode step does: each sequence gains a token before the next lookup.
                for request in requests:
                    request.append_output_token(rng.randrange(vocab))
            print(
                f"vocab {vocab}, from the {name}: {args.num_seqs} sequences of {args.length}+ tokens, "
                f"{min(times) * 1e3:.2f} ms a step (best of {args.repeats})"
            )


if __name__ == "__main__":
    main()

"""The engine's own host work per step: scheduling, packing, bookkeeping and outputs.

    python benchmarks/engine_host.py --batches 1,8,64 --max-tokens 2000

On a GPU a decode step's host work runs between two graph replays, with the GPU idle, so
it adds to every step. Here the worker is replaced by one that returns a fixed token at
once (no model, no sampling), so what is timed is the engine alone: ``LLMEngine.step`` for
``--batches`` greedy requests of a 64-token prompt generating ``--max-tokens`` tokens each,
with each output kind (``SamplingParams.output_kind``): the whole output every step
("cumulative"), what the step added ("delta", what the server streams) and the final output
alone ("final_only", what ``LLM.generate`` and the server's whole responses ask for).
Reported per case: the median step in the first and the last tenth of the generation. Runs on
the CPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
from pathlib import Path

import torch

from neuron_llm.bench import engine
from neuron_llm.config import ModelConfig
from neuron_llm.sample.sampler import SamplerOutput
from neuron_llm.sampling_params import OUTPUT_KINDS
from neuron_llm.worker import StepOutput

VOCAB_SIZE = 1000


def host_steps(batch: int, max_tokens: int, output_kind: str) -> list[float]:
    """Seconds of each engine step with an instant worker."""
    config = ModelConfig(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=max_tokens + 128,
    )  # fmt: skip
    max_model_len = max_tokens + 128
    case = engine.EngineCase(
        lambda: engine.random_llama(config, torch.float32, "cpu"),
        config,
        dtype=torch.float32,
        device="cpu",
        max_model_len=max_model_len,
        max_num_seqs=batch,
        num_kv_blocks=batch * -(-max_model_len // 16) + 1,
        enforce_eager=True,
    )
    llm_engine = case.engine()
    token = torch.tensor([5])
    no_logits = torch.empty(0, VOCAB_SIZE)
    llm_engine.runner.executor.execute_and_sample = lambda step, rows, *unused: StepOutput(
        SamplerOutput(token.expand(len(rows)).clone(), None), no_logits
    )
    gc.collect()  # not the last case's garbage
    return engine.timed_steps(llm_engine, engine.random_prompts(batch, 64, VOCAB_SIZE), max_tokens, output_kind)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--max-tokens", type=int, default=2000)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        for kind in OUTPUT_KINDS:
            times = host_steps(batch, args.max_tokens, kind)[1:]  # the prefill step left out
            tenth = max(1, len(times) // 10)
            row = {
                "batch": batch,
                "output_kind": kind,
                "first_us": 1e6 * statistics.median(times[:tenth]),
                "last_us": 1e6 * statistics.median(times[-tenth:]),
            }
            rows.append(row)
            print(f"batch {batch} {kind}: {row['first_us']:.0f} us a step early, {row['last_us']:.0f} late", flush=True)
    print(f"\n{args.max_tokens} tokens a request; median step, first and last tenth of the generation:\n")
    print("| batch | outputs | early step (us) | late step (us) |")
    print("|---:|---|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['output_kind']} | {r['first_us']:.0f} | {r['last_us']:.0f} |")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Peak memory and time of the neuron backend's paged attention: the whole block-table row
gathered at once beside the row walked in chunks, and the ``torch`` reference, same run.

    python benchmarks/neuron_attention.py --tokens 512 --context 2048
    PJRT_DEVICE=CPU .venv-xla/bin/python benchmarks/neuron_attention.py --device xla

One prefill chunk of ``--tokens`` tokens whose sequence ends at ``--context`` (Llama-3-8B's
heads: 32 query, 8 KV, 128 wide), fp32: on plain CPU tensors (the code that traces into the
XLA graph, run eagerly), or as the graph on torch-xla's CPU device (the first call compiles
it; the time is the median of the calls after). Each variant runs in its own process, so its
peak resident memory (above what the inputs took) is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure(variant: str, tokens: int, context: int, repeats: int, device: str) -> dict[str, float]:
    import torch

    from neuron_llm.backends import neuron
    from neuron_llm.backends.torch_backend import TorchBackend
    from neuron_llm.ops.metadata import AttentionMetadata

    torch.manual_seed(0)
    num_blocks = context // BLOCK_SIZE
    metadata = AttentionMetadata.build([tokens], [context], [list(range(1, num_blocks + 1))], BLOCK_SIZE, "cpu")
    shape = (num_blocks + 1, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    key_cache, value_cache = torch.randn(shape), torch.randn(shape)
    query = torch.randn(tokens, NUM_HEADS, HEAD_DIM)
    sync = lambda out: out  # noqa: E731
    if device == "xla":
        import torch_xla

        xla = torch_xla.device()
        metadata = AttentionMetadata.build([tokens], [context], [list(range(1, num_blocks + 1))], BLOCK_SIZE, xla)
        key_cache, value_cache, query = key_cache.to(xla), value_cache.to(xla), query.to(xla)
        torch_xla.sync()
        sync = lambda out: out.cpu()  # noqa: E731
    if variant == "torch":
        backend = TorchBackend()
    else:
        neuron.CHUNK_KEYS = context if variant == "whole row" else int(variant.split()[0])
        backend = neuron.NeuronBackend()
    inputs_mib = peak_mib()
    times = []
    with torch.no_grad():
        for _ in range(repeats + (device == "xla")):
            start = time.perf_counter()
            sync(backend.paged_attention(query, key_cache, value_cache, metadata, HEAD_DIM**-0.5))
            times.append(time.perf_counter() - start)
    warm = statistics.median(times[device == "xla" :])
    return {"peak_mib": peak_mib() - inputs_mib, "ms": 1e3 * warm, "first_ms": 1e3 * times[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--context", type=int, default=2048, help="a multiple of 16")
    parser.add_argument("--chunks", type=int, nargs="+", default=[512], help="keys per chunk")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "xla"], default="cpu")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.context % BLOCK_SIZE or args.context < args.tokens:
        parser.error(f"--context {args.context}: a multiple of {BLOCK_SIZE} of at least --tokens ({args.tokens})")
    if args.variant:
        print(json.dumps(measure(args.variant, args.tokens, args.context, args.repeats, args.device)))
        return

    # The torch reference loops over sequences on the host: it does not trace into one graph.
    variants = ["torch"] * (args.device == "cpu") + ["whole row", *(f"{keys} keys" for keys in args.chunks)]
    print(f"{args.tokens} tokens over a {args.context}-token row, fp32, {args.device} device")
    print("| attention | peak memory above inputs | time | first call (XLA: with its compile) |\n|---|---:|---:|---:|")
    for variant in variants:
        command = [sys.executable, __file__, "--variant", variant, "--tokens", str(args.tokens)]
        command += ["--context", str(args.context), "--repeats", str(args.repeats), "--device", args.device]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"the {variant!r} variant failed:\n{done.stderr}")
        result = json.loads(done.stdout)
        label = "torch reference" if variant == "torch" else f"neuron, {variant}"
        print(f"| {label} | {result['peak_mib']:,.0f} MiB | {result['ms']:,.0f} ms | {result['first_ms']:,.0f} ms |")


if __name__ == "__main__":
    main()

"""The Triton paged-attention kernels at Llama-3-8B shapes: prefill against SDPA, decode against copy bandwidth.

    python benchmarks/attention_kernels.py --json attention.json            # on a GPU
    python benchmarks/attention_kernels.py --sweep                          # also sweep launch configs
    python benchmarks/attention_kernels.py --smoke                          # tiny shapes, CPU interpreter

Shapes: 32 query heads over 8 KV heads, head_dim 128, block_size 16, bf16, random data,
block tables in a random block order.

- Prefill: one sequence of 4096 and 16384 tokens with no cached context, our kernel beside
  ``scaled_dot_product_attention`` (cuDNN and flash backends) on contiguous [1, heads, seq,
  dim] tensors; TFLOP/s counts the causal half: 2 * 2 * seq^2 * heads * dim / 2. With
  ``--prefill-context N`` the queries follow N cached keys (ours only; N more keys a query).
- Decode: batch {1, 8, 32, 64} x context {1024, 8192, 32768}; bandwidth counts the K/V of
  every context read once plus the query and output, against a device-to-device copy
  measured in the same run (read + write bytes). Each decode case runs in a CUDA graph over
  enough disjoint copies of its inputs that they do not fit in L2. Beside it, the read floor:
  the least time a kernel that only reads as many bytes takes, timed the same way
  (``neuron_llm.bench.read_floor``), and the share of ours it is.
- Verification (``--verify-queries Q``): each decode case again with Q queries a sequence
  (Q - 1 drafted tokens and the last known one), padded to a prefill bucket as the engine
  pads it, run by the prefill kernel; beside it the decode case of the same batch and
  context (the same keys and values read). ``--sweep-splits`` also times each split count
  (of these, of the decode cases and of prefills after ``--prefill-context``),
  ``--sweep-verify`` each with smaller tiles.

Every case is first checked against the torch reference backend (fp32, on sampled rows for
prefill, in groups of sequences for decode). A Markdown table is printed last.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

NUM_HEADS = 32
NUM_KV_HEADS = 8
HEAD_DIM = 128
BLOCK_SIZE = 16
L2_ROTATION_BYTES = 256 << 20
"""Decode inputs are copied until they span this many bytes: five times an H100's 50 MB L2."""
MAX_ERROR = 2e-2
SPLIT_COUNTS = (1, 2, 4, 8, 16, 32, 64)
READ_FLOOR_MAX_BYTES = 1 << 30
"""Decode cases with more keys and values than this get no read floor (a second copy of them
would not fit beside the largest); at that size it is the copy bandwidth anyway."""


@dataclass
class Inputs:
    query: object
    key_cache: object
    value_cache: object
    metadata: object
    tables: list[list[int]]
    seq_lens: list[int]


def make_inputs(
    query_lens: list[int],
    seq_lens: list[int],
    dtype,
    device,
    num_copies: int = 1,
    seed: int = 0,
    num_padded_tokens: int | None = None,
    num_padded_seqs: int | None = None,
) -> list[Inputs]:
    """``num_copies`` batches over one cache pool, each batch on its own blocks in random order."""
    import torch

    from neuron_llm.ops.metadata import AttentionMetadata

    generator = torch.Generator(device=device).manual_seed(seed)
    blocks_per_copy = sum(-(-n // BLOCK_SIZE) for n in seq_lens)
    num_blocks = 1 + num_copies * blocks_per_copy
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    key_cache = torch.randn(shape, generator=generator, dtype=dtype, device=device)
    value_cache = torch.randn(shape, generator=generator, dtype=dtype, device=device)
    block_ids = (torch.randperm(num_blocks - 1, generator=generator, device=device) + 1).tolist()
    width = max(-(-n // BLOCK_SIZE) for n in seq_lens)
    copies = []
    for _ in range(num_copies):
        tables = []
        for seq_len in seq_lens:
            count = -(-seq_len // BLOCK_SIZE)
            tables.append(block_ids[:count])
            block_ids = block_ids[count:]
        metadata = AttentionMetadata.build(
            query_lens, seq_lens, tables, BLOCK_SIZE, device, num_padded_tokens, num_padded_seqs, width
        )
        num_tokens = num_padded_tokens or sum(query_lens)
        query = torch.randn((num_tokens, NUM_HEADS, HEAD_DIM), generator=generator, dtype=dtype, device=device)
        copies.append(Inputs(query, key_cache, value_cache, metadata, tables, list(seq_lens)))
    return copies


def relative_error(actual, expected) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def reference_rows(inputs: Inputs, first_query: int, query_len: int, seq: int = 0):
    """The torch backend's output [query_len, heads, dim] in fp32 for queries ``first_query`` ..
    of sequence ``seq`` (a prefill whose context runs to the last of those queries)."""

    from neuron_llm.backends.torch_backend import TorchBackend
    from neuron_llm.ops.metadata import AttentionMetadata

    seq_len = inputs.seq_lens[seq] - (len(inputs.query) - first_query - query_len)
    table = inputs.tables[seq][: -(-seq_len // BLOCK_SIZE)]
    metadata = AttentionMetadata.build([query_len], [seq_len], [table], BLOCK_SIZE, inputs.query.device)
    query = inputs.query[first_query : first_query + query_len].float()
    key_cache, value_cache = inputs.key_cache.float(), inputs.value_cache.float()
    return TorchBackend().paged_attention(query, key_cache, value_cache, metadata, HEAD_DIM**-0.5)


def check_prefill(inputs: Inputs, out) -> float:
    """Relative error over the first and the last 512 queries of a one-sequence prefill."""
    import torch

    num_tokens = len(inputs.query)
    rows = min(512, num_tokens)
    first = reference_rows(inputs, 0, rows)
    last = reference_rows(inputs, num_tokens - rows, rows)
    return relative_error(torch.cat([out[:rows], out[-rows:]]), torch.cat([first, last]))


def check_decode(inputs: Inputs, out, group: int = 4, query_len: int = 1) -> float:
    """Relative error of a decode batch (``query_len`` queries a sequence), the reference run
    ``group`` sequences at a time."""
    import torch

    from neuron_llm.backends.torch_backend import TorchBackend
    from neuron_llm.ops.metadata import AttentionMetadata

    expected = []
    num_real = len(inputs.seq_lens) * query_len
    for start in range(0, len(inputs.seq_lens), group):
        seq_lens = inputs.seq_lens[start : start + group]
        # The group's blocks, copied in fp32 into a small pool of their own (after a null block).
        block_ids = [0] + [block_id for table in inputs.tables[start : start + group] for block_id in table]
        index = torch.tensor(block_ids, device=out.device)
        key_cache, value_cache = inputs.key_cache[index].float(), inputs.value_cache[index].float()
        tables, next_id = [], 1
        for table in inputs.tables[start : start + group]:
            tables.append(list(range(next_id, next_id + len(table))))
            next_id += len(table)
        metadata = AttentionMetadata.build([query_len] * len(seq_lens), seq_lens, tables, BLOCK_SIZE, out.device)
        query = inputs.query[start * query_len : (start + len(seq_lens)) * query_len].float()
        expected.append(TorchBackend().paged_attention(query, key_cache, value_cache, metadata, HEAD_DIM**-0.5))
    if out[num_real:].any():
        return math.inf  # padding rows must be zeros
    return relative_error(out[:num_real], torch.cat(expected))


def time_ms(fn: Callable[[], object], device) -> float:
    """Median milliseconds of ``fn`` (with L2 flushed before each call on a GPU)."""
    if device.type == "cpu":
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    import triton.testing

    return triton.testing.do_bench(fn, warmup=200, rep=500, return_mode="median")


def time_graph_ms(fns: list[Callable[[], object]], device, min_ms: float = 200.0) -> float:
    """Median milliseconds of one of ``fns``: all captured in one CUDA graph, replayed for
    about ``min_ms`` after as long a warm-up (the GPU's clocks ramp up after idling)."""
    import torch

    if device.type == "cpu":
        start = time.perf_counter()
        for fn in fns:
            fn()
        return (time.perf_counter() - start) * 1e3 / len(fns)
    for fn in fns:
        fn()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    num_replays = max(10, int(min_ms / start.elapsed_time(end)))
    for _ in range(num_replays):
        graph.replay()
    times = []
    for _ in range(num_replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(fns))
    return statistics.median(times)


def copy_bandwidth_gbs(device, num_bytes: int) -> float:
    """Device-to-device copy bandwidth, counting the bytes read and written."""
    import torch

    source = torch.randn(num_bytes // 2, dtype=torch.bfloat16, device=device)
    target = torch.empty_like(source)
    ms = time_ms(lambda: target.copy_(source), device)
    return 2 * num_bytes / ms / 1e6


def prefill_splits(num_tokens: int, context: int, device) -> int:
    """The split count ``prefill_attention`` picks for a step of ``num_tokens`` over block tables ``context`` wide."""
    import torch

    from neuron_llm.backends.cuda import attention

    block_m = attention.default_prefill_config(num_tokens, HEAD_DIM, torch.bfloat16).block_m
    heads = attention._heads_per_program(NUM_HEADS // NUM_KV_HEADS, block_m)
    num_sms = attention._num_sms(device)
    return attention.prefill_num_splits(
        num_tokens, NUM_HEADS, HEAD_DIM, block_m // heads, NUM_HEADS // heads, context, num_sms
    )


def bench_prefill(seq_len: int, context: int, dtype, device, sweep: bool, sweep_splits: bool) -> dict:
    """``seq_len`` queries after ``context`` cached keys (a later chunk of a long prompt, a
    prefix-cache hit); SDPA's anchors only for no context, the prompt case they take."""
    import torch

    from neuron_llm.backends.cuda import attention

    (inputs,) = make_inputs([seq_len], [context + seq_len], dtype, device)
    out = torch.empty_like(inputs.query)
    scale = HEAD_DIM**-0.5

    def run(config: Any = None, num_splits: int | None = None) -> Any:
        return attention.prefill_attention(
            inputs.query, inputs.key_cache, inputs.value_cache, inputs.metadata, scale, out, config, num_splits
        )

    run()
    error = check_prefill(inputs, out)
    flops = 2 * 2 * (seq_len * context + seq_len**2 / 2) * NUM_HEADS * HEAD_DIM
    result = {
        "seq_len": seq_len,
        "context": context,
        "num_splits": prefill_splits(seq_len, context + seq_len, device),
        "error": error,
        "ours_ms": time_ms(run, device),
    }
    if sweep:
        result["sweep"] = sweep_configs(run, device, prefill_configs())
    if sweep_splits and context:
        result["split_sweep"] = split_sweep(lambda n: time_ms(lambda: run(None, n), device), context)
    if context == 0:
        for name, ms in sdpa_times(inputs, device).items():
            result[f"{name}_ms"] = ms
    for key in [k for k in result if k.endswith("_ms")]:
        value = result[key]
        result[key.replace("_ms", "_tflops")] = None if value is None else flops / value / 1e9
    return result


def split_sweep(time_splits: Callable[[int], float], context: int) -> dict:
    """``time_splits(n)`` for each of ``SPLIT_COUNTS`` that leaves a split a 64-key tile or more
    of ``context``, and the fastest."""
    splits = {f"splits={n}": time_splits(n) for n in SPLIT_COUNTS if n == 1 or n * 64 <= context}
    return {"best": min(splits, key=splits.get), "all_ms": splits}


def sdpa_times(inputs: Inputs, device) -> dict[str, float | None]:
    """SDPA on contiguous [1, heads, seq, dim] tensors; K/V repeated per query head if GQA is refused."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if device.type == "cpu":
        return {}
    seq_len = len(inputs.query)
    table = inputs.tables[0]
    query = inputs.query.transpose(0, 1)[None].contiguous()  # [1, heads, seq, dim]
    key = inputs.key_cache[table].flatten(0, 1)[:seq_len].transpose(0, 1)[None].contiguous()
    value = inputs.value_cache[table].flatten(0, 1)[:seq_len].transpose(0, 1)[None].contiguous()
    repeat = NUM_HEADS // NUM_KV_HEADS
    key_full, value_full = key.repeat_interleave(repeat, 1), value.repeat_interleave(repeat, 1)
    times: dict[str, float | None] = {}
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        times[name] = None
        for k, v, gqa in ((key, value, True), (key_full, value_full, False)):

            def fn(k: Any = k, v: Any = v, gqa: bool = gqa) -> Any:
                return F.scaled_dot_product_attention(query, k, v, is_causal=True, enable_gqa=gqa)

            try:
                with sdpa_kernel(backend):
                    fn()
                    times[name] = time_ms(fn, device)
                break
            except RuntimeError as error:
                print(f"sdpa {name} (enable_gqa={gqa}) unavailable: {str(error).splitlines()[0]}", file=sys.stderr)
    return times


def over_copies(copies: list[Inputs], outs: list, kernel: Callable, scale: float, *args) -> list[Callable[[], object]]:
    """A call of ``kernel(query, key_cache, value_cache, metadata, scale, out, *args)`` for each copy of the inputs."""
    return [
        lambda inputs=inputs, out=out: kernel(
            inputs.query, inputs.key_cache, inputs.value_cache, inputs.metadata, scale, out, *args
        )
        for inputs, out in zip(copies, outs)
    ]


def bench_decode(batch: int, context: int, dtype, device, sweep: bool, sweep_splits: bool) -> dict:
    import torch

    from neuron_llm.backends.cuda import attention

    kv_bytes = 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * dtype.itemsize
    io_bytes = 2 * batch * NUM_HEADS * HEAD_DIM * dtype.itemsize
    num_copies = 1 if device.type == "cpu" else min(64, max(1, math.ceil(L2_ROTATION_BYTES / kv_bytes)))
    copies = make_inputs([1] * batch, [context] * batch, dtype, device, num_copies)
    outs = [torch.empty_like(inputs.query) for inputs in copies]
    scale = HEAD_DIM**-0.5
    num_sms = attention._num_sms(device)
    default_splits = attention.decode_num_splits(batch, NUM_KV_HEADS, context // BLOCK_SIZE, BLOCK_SIZE, num_sms)

    def runs(config=None, num_splits=None) -> list[Callable[[], object]]:
        return over_copies(copies, outs, attention.decode_attention, scale, num_splits, config)

    runs()[0]()
    error = check_decode(copies[0], outs[0])
    ms = time_graph_ms(runs(), device)
    result = {
        "batch": batch,
        "context": context,
        "num_splits": default_splits,
        "error": error,
        "ours_ms": ms,
        "bandwidth_gbs": (kv_bytes + io_bytes) / ms / 1e6,
        "read_floor_ms": decode_read_floor_ms(kv_bytes, num_copies, num_sms, device),
    }
    if sweep_splits:
        result["split_sweep"] = split_sweep(lambda n: time_graph_ms(runs(None, n), device, min_ms=50.0), context)
    if sweep:
        candidates = {}
        split_counts = sorted({max(1, default_splits // 2), default_splits, default_splits * 2, default_splits * 4})
        for config, splits in itertools.product(decode_configs(), split_counts):
            key = f"{config} splits={splits}"
            try:
                candidates[key] = time_graph_ms(runs(config, splits), device, min_ms=50.0)
            except Exception as error:  # noqa: BLE001 -- a config that does not compile is skipped
                print(f"skipped {key}: {type(error).__name__}", file=sys.stderr)
        best = min(candidates, key=candidates.get)
        result["sweep"] = {
            "best": best,
            "best_ms": candidates[best],
            "best_bandwidth_gbs": (kv_bytes + io_bytes) / candidates[best] / 1e6,
            "all_ms": candidates,
        }
    return result


def bench_verify(batch: int, query_len: int, context: int, dtype, device, sweep: bool, sweep_splits: bool) -> dict:
    """``query_len`` queries of each of ``batch`` sequences after ``context - query_len`` cached
    keys, padded to the prefill bucket a GPU engine of 64 sequences would run, beside the decode
    case of that batch and context."""
    import torch

    from neuron_llm.backends.cuda import attention
    from neuron_llm.buckets import FINE_PREFILL_STEP, BucketSet

    buckets = BucketSet.default(64, 4096, context, BLOCK_SIZE, prefill_step=FINE_PREFILL_STEP)
    bucket = buckets.select(batch * query_len, batch, is_decode=False)
    num_tokens = bucket.num_tokens
    kv_bytes = 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * dtype.itemsize
    num_copies = 1 if device.type == "cpu" else min(64, max(1, math.ceil(L2_ROTATION_BYTES / kv_bytes)))
    padding = {"num_padded_tokens": num_tokens, "num_padded_seqs": bucket.num_seqs}
    copies = make_inputs([query_len] * batch, [context] * batch, dtype, device, num_copies, **padding)
    outs = [torch.empty_like(inputs.query) for inputs in copies]
    scale = HEAD_DIM**-0.5
    default_splits = prefill_splits(num_tokens, context, device)

    def runs(num_splits=None, config=None) -> list[Callable[[], object]]:
        return over_copies(copies, outs, attention.prefill_attention, scale, config, num_splits)

    runs()[0]()
    error = check_decode(copies[0], outs[0], query_len=query_len)
    ms = time_graph_ms(runs(), device)
    decode = make_inputs([1] * batch, [context] * batch, dtype, device, num_copies)
    decode_outs = [torch.empty_like(inputs.query) for inputs in decode]
    decode_ms = time_graph_ms(over_copies(decode, decode_outs, attention.decode_attention, scale), device)
    result = {
        "batch": batch,
        "query_len": query_len,
        "context": context,
        "num_tokens": num_tokens,
        "num_splits": default_splits,
        "error": error,
        "ours_ms": ms,
        "decode_ms": decode_ms,
        "bandwidth_gbs": kv_bytes / ms / 1e6,
    }
    if sweep or sweep_splits:
        candidates = {}
        for config in verify_configs() if sweep else [None]:
            for splits in SPLIT_COUNTS:
                if splits == 1 or splits * 64 <= context:
                    key = f"{config} splits={splits}" if sweep else f"splits={splits}"
                    try:
                        candidates[key] = time_graph_ms(runs(splits, config), device, min_ms=50.0)
                    except Exception as error:  # noqa: BLE001 -- a config that does not compile is skipped
                        print(f"skipped {key}: {type(error).__name__}", file=sys.stderr)
        best = min(candidates, key=candidates.get)
        result["sweep"] = {"best": best, "best_ms": candidates[best], "all_ms": candidates}
    return result


def decode_read_floor_ms(kv_bytes: int, num_copies: int, num_sms: int, device) -> float | None:
    """The least time of a kernel that only reads ``kv_bytes``, timed as the decode cases are
    (copies in one CUDA graph); None past ``READ_FLOOR_MAX_BYTES``."""
    import torch

    from neuron_llm.bench.read_floor import read_floor

    if kv_bytes > READ_FLOOR_MAX_BYTES:
        return None
    buffers = [torch.empty(kv_bytes, dtype=torch.uint8, device=device) for _ in range(num_copies)]
    return read_floor(buffers, num_sms, lambda read: time_graph_ms([read] * num_copies, device, min_ms=50.0))[0]


def prefill_configs() -> list:
    from neuron_llm.backends.cuda.attention import PrefillConfig

    shapes = itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4))
    # 8 warps held to 128 registers a thread: two programs to a multiprocessor.
    return [
        PrefillConfig(block_m, block_n, num_warps, num_stages, maxnreg)
        for block_m, block_n, num_warps, num_stages in shapes
        for maxnreg in ((None, 128) if num_warps == 8 else (None,))
    ]


def verify_configs() -> list:
    """Smaller tiles than a prompt's, for steps of a few queries a sequence."""
    from neuron_llm.backends.cuda.attention import PrefillConfig

    shapes = [(32, 64, 4, 2), (32, 64, 4, 3), (32, 128, 4, 3), (64, 32, 4, 3), (64, 64, 4, 2), (64, 64, 4, 3)]
    shapes += [(64, 64, 8, 3), (64, 128, 4, 3), (128, 64, 4, 3)]
    return [PrefillConfig(*shape) for shape in shapes] + [PrefillConfig(128, 64, 8, 3, 128)]


def decode_configs() -> list:
    from neuron_llm.backends.cuda.attention import DecodeConfig

    return [
        DecodeConfig(block_n, num_warps, num_stages)
        for block_n, num_warps, num_stages in itertools.product((32, 64, 128), (4, 8), (2, 3, 4, 5))
    ]


def sweep_configs(run: Callable, device, configs: list) -> dict:
    times = {}
    for config in configs:
        try:
            times[str(config)] = time_ms(lambda config=config: run(config), device)
        except Exception as error:  # noqa: BLE001 -- a config that does not compile is skipped
            print(f"skipped {config}: {type(error).__name__}", file=sys.stderr)
    best = min(times, key=times.get)
    return {"best": best, "best_ms": times[best], "all_ms": times}


def markdown(results: dict) -> str:
    def number(value, digits: int = 1) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    lines = [
        f"Device: {results['device']}; copy bandwidth {results['copy_bandwidth_gbs']:.0f} GB/s (read + write)",
        "",
        "| prefill tokens | cached | splits | ours ms | ours TFLOP/s | cuDNN TFLOP/s | flash TFLOP/s "
        "| best split count (ms) | rel. error |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for row in results["prefill"]:
        sweep = row.get("split_sweep")
        best = "" if sweep is None else f"{sweep['best']} ({sweep['all_ms'][sweep['best']]:.3f})"
        lines.append(
            f"| {row['seq_len']} | {row['context']} | {row['num_splits']} | {number(row['ours_ms'], 3)} "
            f"| {number(row['ours_tflops'])} | {number(row.get('cudnn_tflops'))} | {number(row.get('flash_tflops'))} "
            f"| {best} | {row['error']:.1e} |"
        )
    lines += [
        "",
        "| decode batch | context | splits | ours us | GB/s | % of copy | read floor us "
        "| best split count (us) | rel. error |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for row in results["decode"]:
        share = 100 * row["bandwidth_gbs"] / results["copy_bandwidth_gbs"]
        floor = row["read_floor_ms"]
        floor = "n/a" if floor is None else f"{floor * 1e3:.1f} ({floor / row['ours_ms']:.0%})"
        sweep = row.get("split_sweep")
        best = "" if sweep is None else f"{sweep['best']} ({sweep['all_ms'][sweep['best']] * 1e3:.1f})"
        lines.append(
            f"| {row['batch']} | {row['context']} | {row['num_splits']} | {row['ours_ms'] * 1e3:.1f} "
            f"| {row['bandwidth_gbs']:.0f} | {share:.0f}% | {floor} | {best} | {row['error']:.1e} |"
        )
    if results.get("verify"):
        lines += [
            "",
            "| verify batch | queries | context | bucket tokens | splits | ours us | decode us | ours / decode "
            "| best split count (us) | rel. error |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
        ]
        for row in results["verify"]:
            best = row.get("sweep")
            best = "" if best is None else f"{best['best']} ({best['best_ms'] * 1e3:.1f})"
            ours_us, decode_us = row["ours_ms"] * 1e3, row["decode_ms"] * 1e3
            lines.append(
                f"| {row['batch']} | {row['query_len']} | {row['context']} | {row['num_tokens']} | {row['num_splits']} "
                f"| {ours_us:.1f} | {decode_us:.1f} | {ours_us / decode_us:.2f} | {best} | {row['error']:.1e} |"
            )
    return "\n".join(lines)


def _patch_interpreter_scalar_index() -> None:
    """Triton 3.6's interpreter calls int() on scalars held as numpy arrays of shape [1], which
    numpy >= 2.4 refuses (https://github.com/triton-lang/triton/issues/9171); squeeze first."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_lang_tensor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, in Triton's interpreter")
    parser.add_argument("--sweep", action="store_true", help="also time every launch config (and decode split count)")
    parser.add_argument(
        "--sweep-splits", action="store_true", help="also time each split count of the prefill and decode kernels"
    )
    parser.add_argument("--sweep-verify", action="store_true", help="verification: each split count with smaller tiles")
    parser.add_argument("--prefill-lens", type=int, nargs="*", default=[4096, 16384])
    parser.add_argument("--prefill-context", type=int, default=0, help="cached tokens before each prefill")
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 8, 32, 64])
    parser.add_argument("--contexts", type=int, nargs="*", default=[1024, 8192, 32768])
    parser.add_argument(
        "--verify-queries", type=int, nargs="*", default=[], help="also each decode case with this many queries"
    )
    args = parser.parse_args()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
        _patch_interpreter_scalar_index()
        args.prefill_lens, args.batches, args.contexts = [40], [1, 3], [48]
        args.verify_queries = args.verify_queries and [5]

    import torch
    import triton

    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
    elif torch.cuda.is_available():
        device, dtype = torch.device("cuda"), torch.bfloat16
    else:
        sys.exit("needs a GPU (or --smoke)")
    torch.manual_seed(0)
    results = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (Triton interpreter)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "dtype": str(dtype),
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d"),
        "copy_bandwidth_gbs": copy_bandwidth_gbs(device, (1 << 30) if device.type == "cuda" else (1 << 20)),
        "prefill": [],
        "decode": [],
        "verify": [],
    }
    for seq_len in args.prefill_lens:
        results["prefill"].append(
            bench_prefill(seq_len, args.prefill_context, dtype, device, args.sweep, args.sweep_splits)
        )
        print(json.dumps(results["prefill"][-1]), file=sys.stderr)
    free_bytes = torch.cuda.mem_get_info()[0] if device.type == "cuda" else 1 << 30
    for batch, context in itertools.product(args.batches, args.contexts):
        kv_bytes = 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * dtype.itemsize
        if 3 * kv_bytes > free_bytes:  # the cache, and the reference's fp32 copy of it
            print(
                f"skipped decode batch {batch} x context {context}: {kv_bytes / 2**30:.1f} GiB of K/V", file=sys.stderr
            )
            continue
        results["decode"].append(bench_decode(batch, context, dtype, device, args.sweep, args.sweep_splits))
        print(json.dumps(results["decode"][-1]), file=sys.stderr)
        for query_len in args.verify_queries:
            results["verify"].append(
                bench_verify(batch, query_len, context, dtype, device, args.sweep_verify, args.sweep_splits)
            )
            print(json.dumps(results["verify"][-1]), file=sys.stderr)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=2)
    print(markdown(results))
    failed = [row for row in results["prefill"] + results["decode"] + results["verify"] if not row["error"] < MAX_ERROR]
    if failed:
        sys.exit(f"{len(failed)} case(s) differ from the reference by more than {MAX_ERROR}")


if __name__ == "__main__":
    main()

"""The Triton paged-attention kernels against the torch reference backend.

On the CPU they run in Triton's interpreter (fp32, fp16; small shapes); tests marked ``cuda``
run bf16/fp16 at Llama-3-8B shapes and under CUDA-graph capture on a GPU. Every case uses
random block tables, poisons the output and every unused cache slot with NaN, and pads the
batch the way the model runner does.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("triton")

from neuron_llm.backends.cuda import attention, launch
from neuron_llm.backends.cuda.attention import (
    DecodeConfig,
    PrefillConfig,
    decode_attention,
    decode_num_splits,
    prefill_attention,
    prefill_num_splits,
)
from neuron_llm.backends.torch_backend import TorchBackend
from neuron_llm.ops.metadata import AttentionMetadata

# Relative error (by norm) allowed for each input dtype.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@dataclass
class Case:
    query: torch.Tensor
    """[num_tokens, num_heads, head_dim]"""
    key_cache: torch.Tensor
    """[num_blocks, block_size, num_kv_heads, head_dim], NaN in every slot no sequence uses."""
    value_cache: torch.Tensor
    metadata: AttentionMetadata
    expected: torch.Tensor
    """The reference output, computed in a wider dtype from the same (unpoisoned) inputs."""
    scale: float


def make_case(
    query_lens: list[int],
    seq_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    num_padded_tokens: int | None = None,
    num_padded_seqs: int | None = None,
    max_blocks_per_seq: int | None = None,
    seed: int = 0,
    query_scale: float = 1.0,
) -> Case:
    """A padded flat batch over a cache whose blocks are handed out in a random order.
    ``query_scale`` widens the scores: a large one makes a peaked softmax."""
    generator = torch.Generator().manual_seed(seed)
    num_used_blocks = [-(-seq_len // block_size) for seq_len in seq_lens]
    num_blocks = 1 + sum(num_used_blocks) + 3  # the null block, the sequences' blocks, a few spare
    block_ids = (torch.randperm(num_blocks - 1, generator=generator) + 1).tolist()
    tables = []
    for count in num_used_blocks:
        tables.append(block_ids[:count])
        block_ids = block_ids[count:]
    metadata = AttentionMetadata.build(
        query_lens, seq_lens, tables, block_size, device, num_padded_tokens, num_padded_seqs, max_blocks_per_seq
    )
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.randn(shape, generator=generator, dtype=torch.float64)
    value_cache = torch.randn(shape, generator=generator, dtype=torch.float64)
    query = torch.randn((metadata.slot_mapping.shape[0], num_heads, head_dim), generator=generator, dtype=torch.float64)
    query *= query_scale
    # Round to the kernels' dtype first, so that the reference sees the same numbers.
    key_cache, value_cache, query = (t.to(dtype).to(device) for t in (key_cache, value_cache, query))
    scale = head_dim**-0.5
    reference_dtype = torch.float64 if device.type == "cpu" else torch.float32
    expected = TorchBackend().paged_attention(
        query.to(reference_dtype), key_cache.to(reference_dtype), value_cache.to(reference_dtype), metadata, scale
    )
    is_used = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    for table, seq_len in zip(tables, seq_lens):
        for position in range(seq_len):
            is_used[table[position // block_size] * block_size + position % block_size] = True
    is_used = is_used.view(num_blocks, block_size).to(device)
    key_cache[~is_used] = float("nan")
    value_cache[~is_used] = float("nan")
    return Case(query, key_cache, value_cache, metadata, expected, scale)


def assert_close(actual: torch.Tensor, case: Case) -> None:
    expected = case.expected
    assert actual.shape == expected.shape
    assert not actual.isnan().any(), f"NaN in rows {actual.isnan().flatten(1).any(1).nonzero().flatten().tolist()}"
    num_real_tokens = case.metadata.query_start_loc_host[-1]
    assert (actual[num_real_tokens:] == 0).all(), "padding rows must be zeros"
    error = ((actual.to(expected.dtype) - expected).norm() / expected.norm()).item()
    assert error < TOLERANCE[case.query.dtype], f"relative error {error:.2e}"


def run_prefill(case: Case, config: PrefillConfig | None = None, num_splits: int | None = None) -> torch.Tensor:
    out = torch.full_like(case.query, float("nan"))
    result = prefill_attention(
        case.query, case.key_cache, case.value_cache, case.metadata, case.scale, out, config, num_splits
    )
    assert result.data_ptr() == out.data_ptr()
    assert not any(counters.any() for counters in launch._SPLIT_COUNTERS.get(case.query.device, []))
    return result


def run_decode(case: Case, num_splits: int | None = None, config: DecodeConfig | None = None) -> torch.Tensor:
    out = torch.full_like(case.query, float("nan"))
    result = decode_attention(
        case.query, case.key_cache, case.value_cache, case.metadata, case.scale, out, num_splits, config
    )
    assert result.data_ptr() == out.data_ptr()
    # The splits of each sequence left their counters as they found them, zero.
    assert not any(counters.any() for counters in launch._SPLIT_COUNTERS.get(case.query.device, []))
    return result


def poison_partials(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """Fill every split call's partial outputs with NaN and list them: a split kernel must write
    some, and combine only those it wrote."""
    partials = []
    split_buffers = attention._split_buffers

    def poisoned(*args: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        partial_out, partial_lse, counters = split_buffers(*args)
        if partial_out.dim() == 4:  # [tokens, splits, heads, head_dim]: a split call
            partial_out.fill_(float("nan"))
            partials.append(partial_out)
        return partial_out, partial_lse, counters

    monkeypatch.setattr(attention, "_split_buffers", poisoned)
    return partials


def test_split_counters_grow_and_keep_the_buffers_graphs_hold(device: torch.device) -> None:
    """A call needing more counters gets a new buffer; the old one stays allocated, since a CUDA
    graph captured before may still count in it."""
    first = launch.split_counters(device, 1)
    larger = launch.split_counters(device, first.numel() + 1)
    assert larger.numel() > first.numel() and not larger.any()
    assert launch.split_counters(device, 1) is larger
    assert any(buffer is first for buffer in launch._SPLIT_COUNTERS[device])


# (num_heads, num_kv_heads): plain multi-head, groups of 3 and 4, multi-query.
HEAD_LAYOUTS = [(2, 2), (6, 2), (8, 2), (4, 1)]


@pytest.mark.parametrize(("num_heads", "num_kv_heads"), HEAD_LAYOUTS)
@pytest.mark.parametrize("kv_fits_l2", [True, False], ids=["heads-first", "tiles-first"])
def test_prefill_mixed_batch(
    device: torch.device, num_heads: int, num_kv_heads: int, kv_fits_l2: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A whole prompt of odd length, a chunk of a longer prompt, a prefix-cache hit ending on a
    # block boundary, a one-token step; then padding tokens and sequences. Both launch orders.
    if not kv_fits_l2:
        monkeypatch.setattr(attention, "_l2_bytes", lambda device: 0)
    case = make_case(
        query_lens=[37, 20, 5, 1],
        seq_lens=[37, 53, 64, 17],
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=64,
        block_size=16,
        dtype=torch.float32,
        device=device,
        num_padded_tokens=72,
        num_padded_seqs=6,
        max_blocks_per_seq=5,
    )
    assert_close(run_prefill(case), case)


@pytest.mark.parametrize("block_size", [8, 32])
def test_prefill_small_tiles_span_pages_and_sequences(device: torch.device, block_size: int) -> None:
    # Small tiles: many query tiles per sequence, key tiles across page boundaries, contexts
    # filling the block table to its last slot (the bucket boundary).
    case = make_case(
        query_lens=[48, 31, 64, 2],
        seq_lens=[64, 31, 64, 33],
        num_heads=8,
        num_kv_heads=2,
        head_dim=32,
        block_size=block_size,
        dtype=torch.float32,
        device=device,
        num_padded_tokens=160,
        max_blocks_per_seq=64 // block_size,
    )
    assert_close(run_prefill(case, PrefillConfig(block_m=32, block_n=16, num_warps=4, num_stages=2)), case)


@pytest.mark.parametrize("head_dim", [80, 128])
def test_prefill_head_dims(device: torch.device, head_dim: int) -> None:
    case = make_case([19, 3], [19, 40], 4, 2, head_dim, 16, torch.float32, device, num_padded_tokens=24)
    assert_close(run_prefill(case), case)


def test_prefill_fp16(device: torch.device) -> None:
    case = make_case([25, 6], [25, 30], 6, 2, 64, 16, torch.float16, device, num_padded_tokens=32)
    assert_close(run_prefill(case), case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_peaked_softmax(device: torch.device, dtype: torch.dtype) -> None:
    # Scores spread over hundreds: the running max jumps from tile to tile, and exp of an
    # unscaled or wrongly offset score would overflow.
    case = make_case([70, 1], [70, 90], 4, 2, 64, 16, dtype, device, num_padded_tokens=80, query_scale=40.0)
    assert_close(run_prefill(case, PrefillConfig(block_m=32, block_n=16, num_warps=4, num_stages=2)), case)
    decode = make_case([1, 1], [70, 90], 4, 2, 64, 16, dtype, device, query_scale=40.0)
    assert_close(run_decode(decode, num_splits=2, config=DecodeConfig(block_n=16, num_warps=4, num_stages=2)), decode)


def test_prefill_all_padding(device: torch.device) -> None:
    # A batch with no real token (all sequences are padding) is all zeros.
    case = make_case([3], [3], 4, 2, 64, 16, torch.float32, device)
    metadata = AttentionMetadata.build([], [], [], 16, device, num_padded_tokens=8, num_padded_seqs=2)
    query = case.query.new_ones((8, 4, 64))
    out = prefill_attention(query, case.key_cache, case.value_cache, metadata, case.scale)
    assert (out == 0).all()


@pytest.mark.parametrize(("num_heads", "num_kv_heads", "num_splits"), [(6, 2, 3), (8, 2, 16), (4, 1, 16)])
def test_prefill_splits_the_context_of_few_queries(
    device: torch.device, num_heads: int, num_kv_heads: int, num_splits: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Drafted tokens verified after a context ending mid-tile, one decode row, a chunk whose
    # tiles see different numbers of keys (some fewer than a split), a short whole prompt; then
    # padding tokens and sequences. 32-row tiles: a tile's rows are combined in two chunks.
    case = make_case(
        query_lens=[5, 1, 40, 3],
        seq_lens=[260, 131, 200, 3],
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=64,
        block_size=16,
        dtype=torch.float32,
        device=device,
        num_padded_tokens=64,
        num_padded_seqs=6,
        max_blocks_per_seq=17,
    )
    partials = poison_partials(monkeypatch)
    config = PrefillConfig(block_m=32, block_n=16, num_warps=4, num_stages=2)
    first = run_prefill(case, config, num_splits)
    assert_close(first, case)
    assert len(partials) == 1 and not partials[0].isnan().all()
    # Partials are combined in split order: the same bits every time, and within the
    # accumulation's rounding of the unsplit kernel.
    assert torch.equal(run_prefill(case, config, num_splits), first)
    unsplit = run_prefill(case, config, 1)
    assert (first - unsplit).abs().max().item() < 1e-5


def test_prefill_num_splits() -> None:
    # An H100 (132 SMs), 32 query heads of 128 over 8 KV heads in 8 head groups.
    shapes = {"num_heads": 32, "head_dim": 128, "num_head_groups": 8, "num_sms": 132}
    # Few tokens: verification steps of a sequence every 8 tokens, about two programs a
    # multiprocessor; no split shorter than 256 keys of a full-width block table.
    few = [prefill_num_splits(tokens, block_q=16, max_context=32768, **shapes) for tokens in (16, 32, 128)]
    assert few == [16, 8, 2]
    assert prefill_num_splits(16, block_q=16, max_context=2048, **shapes) == 8
    assert prefill_num_splits(16, block_q=16, max_context=256, **shapes) == 1
    # More tokens: one sequence's tiles of 32 tokens; none for a long prompt.
    many = [prefill_num_splits(tokens, block_q=32, max_context=32768, **shapes) for tokens in (256, 512, 2048)]
    assert many == [4, 2, 1]
    # Partial outputs are bounded: 64 MiB of them at most.
    assert prefill_num_splits(16, 1024, 128, 16, 1, 1 << 20, num_sms=10_000) == 8  # 8 MiB a split


def test_few_query_steps_take_smaller_tiles() -> None:
    assert attention.default_prefill_config(128, 128, torch.bfloat16).block_m == 64
    assert attention.default_prefill_config(129, 128, torch.bfloat16).block_m == 128


@pytest.mark.parametrize(("num_heads", "num_kv_heads"), HEAD_LAYOUTS)
@pytest.mark.parametrize("num_splits", [1, 3, None])
def test_decode(device: torch.device, num_heads: int, num_kv_heads: int, num_splits: int | None) -> None:
    # Contexts of one token, odd ones, one ending on a block boundary and one filling the table;
    # two padding sequences, and query rows past the block table's rows.
    seq_lens = [1, 17, 64, 45, 80]
    case = make_case(
        query_lens=[1] * len(seq_lens),
        seq_lens=seq_lens,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=64,
        block_size=16,
        dtype=torch.float32,
        device=device,
        num_padded_tokens=8,
        num_padded_seqs=7,
        max_blocks_per_seq=5,
    )
    assert case.metadata.is_decode
    assert_close(run_decode(case, num_splits, DecodeConfig(block_n=16, num_warps=4, num_stages=2)), case)


@pytest.mark.parametrize("num_splits", [16, 32])
def test_decode_splits_combine_the_same_way_every_time(device: torch.device, num_splits: int) -> None:
    """Contexts of one run, of a few runs, and of more runs than a trip of the combine reads
    (9 of 16 splits, in trips of 8 for 4 query heads a KV head; 17 of 32, in one trip): the
    combine is deterministic."""
    case = make_case([1] * 4, [12, 40, 130, 260], 8, 2, 64, 16, torch.float32, device, num_padded_seqs=5)
    config = DecodeConfig(block_n=16, num_warps=4, num_stages=2)
    first = run_decode(case, num_splits=num_splits, config=config)
    assert_close(first, case)
    assert torch.equal(run_decode(case, num_splits=num_splits, config=config), first)


def test_decode_combine_reads_32_splits_in_one_trip() -> None:
    assert [attention.decode_combine_splits(n, 4) for n in (4, 16, 32)] == [4, 8, 32]
    assert attention.decode_combine_splits(32, 8) == 16  # at most 128 partials a trip
    assert attention.decode_combine_splits(64, 4) == 32


@pytest.mark.parametrize("head_dim", [80, 128])
def test_decode_head_dims_and_default_config(device: torch.device, head_dim: int) -> None:
    case = make_case([1, 1], [150, 7], 4, 1, head_dim, 16, torch.float32, device, num_padded_seqs=3)
    assert_close(run_decode(case, num_splits=2), case)


def test_decode_fp16(device: torch.device) -> None:
    case = make_case([1] * 3, [33, 96, 5], 8, 2, 64, 32, torch.float16, device, num_padded_tokens=4)
    assert_close(run_decode(case, num_splits=4), case)


def test_decode_num_splits() -> None:
    # An H100 (132 SMs), 8 KV heads. A wide block table and one sequence: as many splits as
    # the rule allows; a narrow one: one a 64-key tile, or none; always a power of two, fewer
    # as the batch grows.
    assert decode_num_splits(1, 8, 2048, 16, num_sms=132) == attention.DECODE_MAX_SPLITS == 32
    assert decode_num_splits(1, 8, 64, 16, num_sms=132) == 16
    assert decode_num_splits(1, 8, 4, 16, num_sms=132) == 1
    splits = [decode_num_splits(num_seqs, 8, 512, 16, num_sms=132) for num_seqs in (1, 2, 8, 16, 32, 256)]
    assert splits == [32, 16, 4, 2, 1, 1]


@pytest.mark.parametrize("num_splits", [0, attention.MAX_SPLITS + 1])
def test_split_counts_out_of_range_are_refused(device: torch.device, num_splits: int) -> None:
    case = make_case([1], [4], 2, 2, 16, 16, torch.float32, device)
    with pytest.raises(ValueError, match=f"num_splits={num_splits} must be from 1 to"):
        prefill_attention(case.query, case.key_cache, case.value_cache, case.metadata, 1.0, num_splits=num_splits)
    with pytest.raises(ValueError, match=f"num_splits={num_splits} must be from 1 to"):
        decode_attention(case.query, case.key_cache, case.value_cache, case.metadata, 1.0, num_splits=num_splits)


def test_unsupported_head_dim_is_refused(device: torch.device) -> None:
    case = make_case([1], [4], 2, 2, 16, 16, torch.float32, device)
    query = case.query.new_zeros((1, 2, 320))
    cache = case.key_cache.new_zeros((4, 16, 2, 320))
    with pytest.raises(ValueError, match="head_dim=320"):
        decode_attention(query, cache, cache, case.metadata, 1.0)


# The GPU: Llama-3-8B attention shapes (32 query heads over 8 KV heads, head_dim 128).


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prefill_llama3_shapes_on_gpu(device: torch.device, dtype: torch.dtype) -> None:
    # A long prompt, a 512-token chunk after 1500 cached tokens, a prefix hit, a short prompt.
    case = make_case(
        query_lens=[1500, 512, 100, 7],
        seq_lens=[1500, 2012, 1124, 7],
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        block_size=16,
        dtype=dtype,
        device=device,
        num_padded_tokens=2304,
        num_padded_seqs=8,
        max_blocks_per_seq=128,
    )
    assert_close(run_prefill(case), case)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prefill_few_queries_over_long_contexts_on_gpu(
    device: torch.device, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Verification steps in a 64-token bucket: the default split count for 8k-wide tables.
    case = make_case(
        query_lens=[5, 5, 3, 16, 1],
        seq_lens=[8000, 4101, 12, 7999, 2048],
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        block_size=16,
        dtype=dtype,
        device=device,
        num_padded_tokens=64,
        num_padded_seqs=16,
        max_blocks_per_seq=512,
    )
    partials = poison_partials(monkeypatch)
    assert_close(run_prefill(case), case)
    assert len(partials) == 1 and partials[0].shape[1] > 1 and not partials[0].isnan().all()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_long_contexts_on_gpu(device: torch.device, dtype: torch.dtype) -> None:
    seq_lens = [8192, 1, 4097, 16384, 513, 12000]
    case = make_case(
        [1] * len(seq_lens), seq_lens, 32, 8, 128, 16, dtype, device, num_padded_seqs=8, max_blocks_per_seq=1024
    )
    assert_close(run_decode(case), case)


@pytest.mark.cuda
@pytest.mark.parametrize("head_dim", [64, 96, 256])
def test_other_head_dims_on_gpu(device: torch.device, head_dim: int) -> None:
    prefill = make_case([300, 40], [300, 700], 12, 4, head_dim, 32, torch.bfloat16, device, num_padded_tokens=352)
    assert_close(run_prefill(prefill), prefill)
    decode = make_case([1] * 3, [3000, 5, 1024], 12, 4, head_dim, 32, torch.bfloat16, device, num_padded_seqs=4)
    assert_close(run_decode(decode), decode)


@pytest.mark.cuda
def test_decode_in_cuda_graph(device: torch.device) -> None:
    """Captured once, replayed with other lengths and block tables written into the same tensors."""
    shapes = (32, 8, 128, 16, torch.bfloat16, device)  # heads, KV heads, head_dim, block_size, dtype, device
    padding = {"num_padded_tokens": 8, "num_padded_seqs": 8, "max_blocks_per_seq": 256}
    first = make_case([1] * 4, [100, 3000, 17, 2048], *shapes, **padding)
    second = make_case([1] * 6, [4096, 1, 999, 64, 2500, 33], *shapes, **padding)
    assert first.key_cache.shape[0] <= second.key_cache.shape[0]
    key_cache, value_cache = second.key_cache.clone(), second.value_cache.clone()
    key_cache[: first.key_cache.shape[0]] = first.key_cache
    value_cache[: first.value_cache.shape[0]] = first.value_cache
    metadata, query = first.metadata, first.query.clone()
    out = torch.full_like(query, float("nan"))

    decode_attention(query, key_cache, value_cache, metadata, first.scale, out)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_attention(query, key_cache, value_cache, metadata, first.scale, out)
    graph.replay()
    assert_close(out, first)

    key_cache.copy_(second.key_cache)
    value_cache.copy_(second.value_cache)
    query.copy_(second.query)
    for name in ("block_tables", "seq_lens", "query_start_loc"):
        getattr(metadata, name).copy_(getattr(second.metadata, name))
    out.fill_(float("nan"))
    graph.replay()
    assert_close(out, second)

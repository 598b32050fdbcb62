"""The bucket sets steps are padded to."""

from __future__ import annotations

import pytest

from neuron_llm.buckets import BucketSet
from neuron_llm.config import (
    CacheConfig,
    DeviceConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
    parse_context_buckets,
)


def test_prefill_buckets_double_then_grow_by_the_step() -> None:
    coarse = BucketSet.default(max_num_seqs=64, max_num_batched_tokens=4096, max_model_len=8192, block_size=16)
    assert [b.num_tokens for b in coarse.prefill] == [16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
    fine = BucketSet.default(64, 4096, 8192, 16, prefill_step=256)
    assert [b.num_tokens for b in fine.prefill] == [16, 32, 64, 128, 256] + list(range(512, 4097, 256))
    finer = BucketSet.default(64, 4096, 8192, 16, prefill_step=128)
    assert [b.num_tokens for b in finer.prefill] == [16, 32, 64, 128] + list(range(256, 4097, 128))
    assert fine.decode == coarse.decode
    # Every sequence of a step computes a token, so no bucket has more sequences than tokens.
    assert [b.num_seqs for b in fine.prefill] == [16, 32] + [64] * (len(fine.prefill) - 2)
    assert fine.select(16, 16, is_decode=False).name == "prefill_t16_s16"
    # Nor more decodes than the step's token budget.
    assert [b.num_tokens for b in BucketSet.default(64, 16, 8192, 16).decode] == [1, 2, 4, 8, 16]
    assert fine.select(513, 3, is_decode=False).num_tokens == 768
    assert coarse.select(513, 3, is_decode=False).num_tokens == 1024
    # The scheduler's limit is a bucket itself, whether or not the step divides it.
    assert [b.num_tokens for b in BucketSet.default(64, 1000, 8192, 16, prefill_step=256).prefill][-3:] == [
        512,
        768,
        1000,
    ]
    assert [b.num_tokens for b in BucketSet.default(2, 512, 64, 16, prefill_step=256).prefill] == [16, 32, 64, 128]
    with pytest.raises(ValueError, match="a prefill step of 4097 tokens over 1 sequences fits no configured bucket"):
        fine.select(4097, 1, is_decode=False)


def test_speculation_on_xla_adds_a_bucket_for_each_decode_batch_verifying_its_proposals() -> None:
    from neuron_llm.config import DeviceConfig, EngineConfig, ModelConfig, SchedulerConfig, SpeculativeConfig

    buckets = BucketSet.default(8, 64, 256, 16, num_speculative_tokens=4)
    # Decode batches of 1, 2, 4, 8 sequences, each with 4 proposals: 5, 10, 20, 40 tokens.
    assert [b.name for b in buckets.prefill] == [
        "prefill_t5_s1", "prefill_t10_s2", "prefill_t16_s8", "prefill_t20_s4", "prefill_t32_s8", "prefill_t40_s8",
        "prefill_t64_s8",
    ]  # fmt: skip
    assert buckets.select(5, 1, is_decode=False).name == "prefill_t5_s1"
    assert buckets.select(9, 2, is_decode=False).name == "prefill_t10_s2"
    assert buckets.select(5, 2, is_decode=False).name == "prefill_t10_s2"
    assert buckets.decode == BucketSet.default(8, 64, 256, 16).decode

    model = ModelConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
    )  # fmt: skip
    scheduler = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64)
    speculative = SpeculativeConfig(num_speculative_tokens=4)

    def prefill_sizes(device: str) -> list[int]:
        config = EngineConfig(model, DeviceConfig(device=device), scheduler=scheduler, speculative=speculative)
        return [b.num_tokens for b in BucketSet.for_engine(config).prefill]

    # Only where each bucket is compiled and a step computes all of its tokens.
    assert prefill_sizes("xla") == [5, 10, 16, 20, 32, 40, 64]
    assert prefill_sizes("cpu") == [16, 32, 64]


def test_block_tables_take_the_narrowest_context_width_holding_the_step() -> None:
    # Off the XLA device: one width, max_model_len's.
    assert BucketSet.default(8, 64, 1000, 16).block_table_widths == (63,)
    buckets = BucketSet.default(8, 64, 1000, 16, context_lengths=(100, 512, 256))
    assert buckets.block_table_widths == (7, 16, 32, 63) and buckets.max_blocks_per_seq == 63
    assert [buckets.width_for(n) for n in (1, 7, 8, 16, 17, 33, 63)] == [7, 7, 16, 16, 32, 63, 63]
    with pytest.raises(ValueError, match=r"64 blocks exceed the widest block table \(63\)"):
        buckets.width_for(64)


@pytest.mark.parametrize(
    ("max_model_len", "context_buckets", "widths"),
    [
        (8192, None, (32, 128, 512)),  # 512, 2048 and 8192 tokens in blocks of 16; none below 512
        (131072, None, (128, 512, 2048, 8192)),  # three quarters at most
        (4096, None, (64, 256)),
        (2048, None, (32, 128)),
        (300, None, (19,)),
        (8192, (1024,), (64, 512)),
    ],
)
def test_the_xla_device_pads_block_tables_to_context_buckets(max_model_len, context_buckets, widths) -> None:
    model = ModelConfig(
        vocab_size=64,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=4,
        max_position_embeddings=131072,
    )
    config = EngineConfig(
        model=model,
        device=DeviceConfig(device="xla", context_buckets=context_buckets),
        cache=CacheConfig(block_size=16, num_kv_blocks=64),
        scheduler=SchedulerConfig(max_model_len=max_model_len),
    )
    assert BucketSet.for_engine(config).block_table_widths == widths


def test_context_buckets_are_read_from_text() -> None:
    assert parse_context_buckets("512, 1024,") == [512, 1024]
    with pytest.raises(ValueError, match="context_buckets='512,1k': must be comma-separated integers"):
        parse_context_buckets("512,1k")


@pytest.mark.parametrize(
    ("max_num_seqs", "max_num_batched_tokens", "speculative"), [(1, 64, None), (4, 32, None), (3, 48, 2), (8, 16, None)]
)
def test_every_step_runs_a_bucket_warmed_up_at_its_width(max_num_seqs, max_num_batched_tokens, speculative) -> None:
    # Every feasible step shape: k sequences, n tokens (n == k: a decode step), the longest
    # sequence's context L (each sequence computes at most its context).
    buckets = BucketSet.default(
        max_num_seqs, max_num_batched_tokens, 64, 4, num_speculative_tokens=speculative, context_lengths=(8, 16, 32)
    )
    warmed = {(bucket, width) for bucket in buckets.all for width in buckets.widths_for(bucket)}
    run = set()
    for k in range(1, min(max_num_seqs, max_num_batched_tokens) + 1):
        for longest in range(1, 65):
            for n in range(k, min(max_num_batched_tokens, k * longest) + 1):
                run.add((buckets.select(n, k, is_decode=n == k), buckets.width_for(-(-longest // 4))))
    assert run <= warmed
    if max_num_seqs == 1:  # one sequence of at most 8 tokens never fills the 16-to-64-token buckets
        assert len(warmed) < len(buckets.all) * len(buckets.block_table_widths)
        assert warmed - run == set()

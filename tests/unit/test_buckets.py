"""The bucket sets steps are padded to."""

from __future__ import annotations

import pytest

from neuron_llm.buckets import BucketSet


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

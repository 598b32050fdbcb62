"""How large a KV pool memory allows on the CPU, where tensor-parallel ranks share one host."""

from __future__ import annotations

import os

import pytest

from neuron_llm.config import EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
from neuron_llm.worker import CPU_KV_CACHE_BYTES, kv_block_bytes, num_kv_heads_per_rank, size_kv_pool

MODEL = ModelConfig(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=8192,
)


def pool_bytes_on_all_ranks(tensor_parallel_size: int, total_weight_bytes: int) -> int:
    config = EngineConfig(
        model=MODEL,
        parallel=ParallelConfig(tensor_parallel_size=tensor_parallel_size),
        scheduler=SchedulerConfig(max_model_len=8192, max_num_seqs=256),
    )
    num_blocks = size_kv_pool(config, total_weight_bytes // tensor_parallel_size)
    num_kv_heads = num_kv_heads_per_rank(MODEL, tensor_parallel_size)
    block_bytes = kv_block_bytes(MODEL, config.cache.block_size, num_kv_heads, config.device.dtype)
    return tensor_parallel_size * num_blocks * block_bytes


@pytest.mark.parametrize("tensor_parallel_size", [1, 2, 4])
def test_the_ranks_on_one_host_share_what_the_weights_leave(tensor_parallel_size: int) -> None:
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    left = 1 << 30
    weights = int(host * 0.9) - left  # the default memory_fraction leaves 1 GiB after the weights
    total = pool_bytes_on_all_ranks(tensor_parallel_size, weights)
    assert left // 2 < total <= left


@pytest.mark.parametrize("tensor_parallel_size", [1, 2])
def test_the_default_cpu_pool_is_capped_for_all_ranks_together(tensor_parallel_size: int) -> None:
    total = pool_bytes_on_all_ranks(tensor_parallel_size, total_weight_bytes=0)
    assert CPU_KV_CACHE_BYTES // 2 < total <= CPU_KV_CACHE_BYTES

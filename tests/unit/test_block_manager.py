"""The KV block pool: exact block ids after allocate, append, free, fork and prefix hits."""

from __future__ import annotations

import subprocess
import sys

import pytest

from neuron_llm.engine import block_manager
from neuron_llm.engine.block_manager import NULL_BLOCK_ID, BlockManager


def test_null_block_is_the_one_attention_pads_into() -> None:
    from neuron_llm.ops.metadata import NULL_BLOCK_ID as METADATA_NULL_BLOCK_ID

    assert NULL_BLOCK_ID == METADATA_NULL_BLOCK_ID == 0


def test_engine_core_imports_no_torch() -> None:
    code = "import sys, neuron_llm.engine; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_allocate_append_free_exact_ids() -> None:
    manager = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    assert manager.num_usable_blocks == 7 and manager.num_free_blocks == 7

    assert manager.allocate("a", 10) == [1, 2, 3]
    assert manager.allocate("b", 4) == [4]
    assert manager.append_slots("b", 4) == [4]  # exactly one full block
    assert manager.append_slots("b", 5) == [4, 5]
    assert manager.append_slots("b", 8) == [4, 5]  # room left in block 5
    assert manager.num_free_blocks == 2
    assert manager.usage == pytest.approx(5 / 7)
    assert [manager.ref_count(block_id) for block_id in range(8)] == [0, 1, 1, 1, 1, 1, 0, 0]

    manager.free("a")
    assert [manager.ref_count(block_id) for block_id in (1, 2, 3)] == [0, 0, 0]
    # Recently freed blocks are reused first, lowest table position first.
    assert manager.allocate("c", 5) == [1, 2]
    manager.free("b")
    manager.free("c")
    assert manager.num_free_blocks == 7 and manager.usage == 0.0
    assert all(manager.ref_count(block_id) == 0 for block_id in range(8))


def test_block_zero_is_never_handed_out() -> None:
    manager = BlockManager(num_blocks=5, block_size=1, enable_prefix_caching=False)
    assert manager.allocate("a", 4) == [1, 2, 3, 4]
    assert manager.allocate("b", 1) is None


def test_out_of_blocks_returns_none_and_changes_nothing() -> None:
    manager = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    assert manager.allocate("a", 5) == [1, 2, 3]
    assert manager.allocate("b", 1) is None
    with pytest.raises(KeyError):
        manager.block_table("b")
    assert manager.append_slots("a", 7) is None
    assert manager.block_table("a") == [1, 2, 3]
    assert not manager.can_allocate(1)
    assert manager.usage == 1.0

    manager.free("a")
    assert manager.can_allocate(6)
    assert not manager.can_allocate(7)


def test_prefix_hit_reuses_exact_blocks_and_reports_cached_tokens() -> None:
    manager = BlockManager(num_blocks=8, block_size=4)
    tokens = list(range(100, 110))
    miss = manager.lookup_prefix(tokens)
    assert miss.block_ids == [] and miss.num_cached_tokens == 0
    assert manager.allocate("a", 10, miss) == [1, 2, 3]

    # Nothing is found before the K/V is computed and the blocks are published.
    assert manager.lookup_prefix(tokens).block_ids == []
    manager.cache_full_blocks("a", tokens, 10)
    assert [manager.is_cached(block_id) for block_id in (1, 2, 3)] == [True, True, False]

    other = tokens[:8] + [7, 8, 9]
    hit = manager.lookup_prefix(other)
    assert hit.block_ids == [1, 2] and hit.num_cached_tokens == 8
    assert manager.allocate("b", 11, hit) == [1, 2, 4]
    assert [manager.ref_count(block_id) for block_id in (1, 2, 3, 4)] == [2, 2, 1, 1]
    assert manager.num_prefix_query_tokens == 21
    assert manager.num_prefix_hit_tokens == 8
    assert manager.prefix_hit_rate == pytest.approx(8 / 21)

    # A different second block: the chain of hashes stops at the first block.
    diverging = tokens[:4] + [0, 0, 0, 0, 1]
    assert manager.lookup_prefix(diverging).block_ids == [1]

    manager.free("a")
    manager.free("b")
    assert manager.num_free_blocks == 7


def test_block_holding_the_last_prompt_token_is_never_a_hit() -> None:
    manager = BlockManager(num_blocks=8, block_size=4)
    tokens = list(range(12))
    manager.allocate("a", 12, manager.lookup_prefix(tokens))
    manager.cache_full_blocks("a", tokens, 12)
    assert [manager.is_cached(block_id) for block_id in (1, 2, 3)] == [True, True, True]

    # 8 tokens fill blocks 1 and 2, but block 2 holds the last token: it is computed again.
    exact = manager.lookup_prefix(tokens[:8])
    assert exact.block_ids == [1] and exact.num_cached_tokens == 4
    longer = manager.lookup_prefix(tokens[:9])
    assert longer.block_ids == [1, 2] and longer.num_cached_tokens == 8
    assert manager.lookup_prefix(tokens[:4]).block_ids == []
    assert manager.lookup_prefix(tokens).num_cached_tokens == 8


def test_a_lookup_repeated_hashes_nothing_and_drops_evicted_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    manager = BlockManager(num_blocks=6, block_size=2)
    prompt = [0, 1, 2, 3, 4, 5, 6]
    manager.allocate("a", 7, manager.lookup_prefix(prompt))
    manager.cache_full_blocks("a", prompt, 7)
    manager.free("a")  # tail first: block 3 is the least recently used of the cached 1-3
    first = manager.lookup_prefix(prompt)
    assert first.block_ids == [1, 2, 3]
    monkeypatch.setattr(block_manager, "hash_block", None)  # any hashing now fails
    assert manager.lookup_prefix(prompt, first) is first
    assert manager.allocate("b", 4) == [4, 5]  # uncached blocks first: nothing evicted
    assert manager.lookup_prefix(prompt, first) is first
    assert manager.allocate("c", 2) == [3]  # evicts the least recently used cached block
    assert manager.lookup_prefix(prompt, first).block_ids == [1, 2]


def test_a_repeated_lookup_counts_the_hit_blocks_no_sequence_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    # Admission takes a hit's unheld blocks out of the free pool: the count must follow every
    # sequence that takes or frees them, not only evictions.
    manager = BlockManager(num_blocks=8, block_size=2)
    prompt = [0, 1, 2, 3, 4, 5, 6]
    manager.allocate("a", 7, manager.lookup_prefix(prompt))
    manager.cache_full_blocks("a", prompt, 7)
    assert manager.lookup_prefix(prompt).num_unheld_blocks == 0
    manager.free("a")
    first = manager.lookup_prefix(prompt)
    assert (first.block_ids, first.num_unheld_blocks) == ([1, 2, 3], 3)
    assert manager.allocate("b", 5, manager.lookup_prefix([0, 1, 2, 3, 99])) == [1, 2, 4]
    monkeypatch.setattr(block_manager, "hash_block", None)  # any hashing now fails
    again = manager.lookup_prefix(prompt, first)
    assert (again.block_ids, again.num_unheld_blocks) == ([1, 2, 3], 1)
    assert manager.allocate("c", 2) == [5]  # an uncached block: the hit stands as it was
    assert manager.lookup_prefix(prompt, again) is again
    manager.free("b")
    assert manager.lookup_prefix(prompt, again).num_unheld_blocks == 3


def test_cached_free_blocks_are_evicted_least_recently_used_first() -> None:
    manager = BlockManager(num_blocks=5, block_size=2)
    prompt_a, prompt_b = [0, 1, 2, 3], [10, 11, 12, 13]
    assert manager.allocate("a", 4, manager.lookup_prefix(prompt_a)) == [1, 2]
    assert manager.allocate("b", 4, manager.lookup_prefix(prompt_b)) == [3, 4]
    manager.cache_full_blocks("a", prompt_a, 4)
    manager.cache_full_blocks("b", prompt_b, 4)
    # Freed tail first, so the least recently used order is 2, 1, 4, 3.
    manager.free("a")
    manager.free("b")
    assert manager.num_free_blocks == 4 and manager.usage == 0.0

    assert manager.allocate("c", 2) == [2]
    assert not manager.is_cached(2)
    assert manager.lookup_prefix(prompt_a + [5]).block_ids == [1]
    assert manager.allocate("d", 4) == [1, 4]
    assert not manager.is_cached(1) and not manager.is_cached(4)
    assert manager.lookup_prefix(prompt_a + [5]).block_ids == []
    assert manager.lookup_prefix(prompt_b + [5]).block_ids == [3]


def test_uncached_free_blocks_are_taken_before_evicting() -> None:
    manager = BlockManager(num_blocks=5, block_size=2)
    prompt = [0, 1, 2, 3]
    manager.allocate("a", 4, manager.lookup_prefix(prompt))
    manager.cache_full_blocks("a", prompt, 4)
    manager.free("a")
    assert manager.allocate("b", 4) == [3, 4]
    assert manager.is_cached(1) and manager.is_cached(2)
    assert manager.allocate("c", 1) == [2]
    assert manager.is_cached(1) and not manager.is_cached(2)


def test_hit_on_cached_free_blocks_counts_them_against_the_free_pool() -> None:
    manager = BlockManager(num_blocks=4, block_size=2)
    prompt = [0, 1, 2, 3]
    manager.allocate("a", 4, manager.lookup_prefix(prompt))
    manager.cache_full_blocks("a", prompt, 4)
    manager.free("a")

    # Blocks 1 and 2 are hits and free; a third block is needed; 3 are free: it fits.
    hit = manager.lookup_prefix(prompt + [4])
    assert hit.block_ids == [1, 2]
    assert manager.allocate("b", 5, hit) == [1, 2, 3]
    assert manager.usage == 1.0
    manager.free("b")

    # Two hits and two fresh blocks would need 4 of the 3: refused, nothing taken.
    hit = manager.lookup_prefix(prompt + [4, 5, 6])
    assert hit.block_ids == [1, 2]
    assert manager.allocate("c", 7, hit) is None
    assert manager.num_free_blocks == 3
    assert manager.ref_count(1) == manager.ref_count(2) == 0
    assert manager.lookup_prefix(prompt + [4]).block_ids == [1, 2]


def test_fork_shares_full_blocks_only() -> None:
    manager = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    assert manager.allocate("a", 10) == [1, 2, 3]
    assert manager.fork("a", "b", 8) == [1, 2]
    assert [manager.ref_count(block_id) for block_id in (1, 2, 3)] == [2, 2, 1]
    # The child computes the parent's partial tail into its own block.
    assert manager.append_slots("b", 10) == [1, 2, 4]
    manager.free("a")
    assert [manager.ref_count(block_id) for block_id in (1, 2, 3, 4)] == [1, 1, 0, 1]
    manager.free("b")
    assert manager.num_free_blocks == 7


def test_identical_blocks_computed_concurrently_publish_one() -> None:
    manager = BlockManager(num_blocks=8, block_size=2)
    tokens = [5, 6, 7]
    assert manager.allocate("a", 3, manager.lookup_prefix(tokens)) == [1, 2]
    assert manager.allocate("b", 3, manager.lookup_prefix(tokens)) == [3, 4]
    manager.cache_full_blocks("a", tokens, 3)
    manager.cache_full_blocks("b", tokens, 3)
    assert manager.is_cached(1) and not manager.is_cached(3)
    assert manager.lookup_prefix(tokens).block_ids == [1]
    manager.free("a")
    manager.free("b")
    assert manager.num_free_blocks == 7
    assert manager.lookup_prefix(tokens).block_ids == [1]


def test_everything_freed_leaves_every_block_free() -> None:
    manager = BlockManager(num_blocks=16, block_size=4)
    prompt = list(range(20))
    for index in range(3):
        seq_id = f"s{index}"
        tokens = prompt + [index]
        manager.allocate(seq_id, len(tokens), manager.lookup_prefix(tokens))
        manager.cache_full_blocks(seq_id, tokens, len(tokens))
    manager.fork("s0", "child", 8)
    for seq_id in ("s0", "s1", "s2", "child"):
        manager.free(seq_id)
    assert manager.num_free_blocks == manager.num_usable_blocks == 15
    assert manager.usage == 0.0
    assert all(manager.ref_count(block_id) == 0 for block_id in range(16))

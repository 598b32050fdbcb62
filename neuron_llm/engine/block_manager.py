"""The paged KV pool: block allocation, reference counts and prefix caching.

A sequence owns a block table; block ``i`` of the table stores the K/V of its tokens
``i * block_size`` to ``(i + 1) * block_size - 1``. With a block size of 4, 10 tokens::

    tokens:  t0 t1 t2 t3 | t4 t5 t6 t7 | t8 t9 .. ..
    table:       [7]     |     [3]     |    [9]
    hash:    h0=H(-,t0..t3) h1=H(h0,t4..t7)  none: not full

Once a full block's K/V has been computed it is published in the prefix cache under the hash
of (its parent's hash, its tokens), so its hash names the whole prefix up to its end. A later
sequence whose tokens start the same way finds that chain of blocks and shares it, counting
one more reference on each block.

A block whose count drops to 0 goes back to a free pool, in one of two queues::

    uncached free: | never used, or never published |  taken first
    cached free:   | LRU ... MRU                    |  still found by hash; evicted LRU first,
                                                       only when the uncached queue is empty

Block ``NULL_BLOCK_ID`` is never handed out: padding tokens write their K/V there.
Sharing is of full blocks only. A block is only ever written by the one sequence that
allocated it, before it is shared, so there is no copy-on-write: a sequence that starts from
another one's prefix (a prefix-cache hit, a fork) recomputes the tokens of the partly filled
last block into a block of its own.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass

NULL_BLOCK_ID = 0
"""The reserved block; the same value as ``neuron_llm.ops.metadata.NULL_BLOCK_ID`` (that module
imports torch, which the engine core does not)."""

BlockHash = bytes


def hash_block(parent_hash: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
    """Hash of one full block: SHA-256 over its parent's hash and its token ids.

    A collision would make a sequence attend to another prompt's K/V without any error, so a
    cryptographic digest is used rather than Python's 64-bit ``hash``.
    """
    digest = hashlib.sha256(parent_hash or b"")
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


@dataclass(frozen=True)
class PrefixHit:
    """The leading full blocks of a token sequence that the prefix cache already holds."""

    block_ids: list[int]
    """Cached blocks, in table order."""
    block_hashes: list[BlockHash]
    """The hash each of those blocks is published under."""
    num_cached_tokens: int
    """Tokens whose K/V need not be computed: ``len(block_ids) * block_size``."""
    num_query_tokens: int
    """Tokens looked up."""
    num_unheld_blocks: int = 0
    """Of ``block_ids``, those no sequence holds: taking them takes free blocks too."""
    version: int = -1
    """The manager's ``free_cached_version`` when looked up: the hit holds while it does."""


class BlockManager:
    """Hands out the KV blocks ``1 .. num_blocks - 1`` to sequences named by a string id.

    Running out of blocks is a normal outcome: ``allocate`` and ``append_slots`` then return
    ``None`` and change nothing, and the caller preempts a sequence.

    Args:
        num_blocks: blocks in each layer's KV pool, the null block included.
        block_size: tokens per block.
        enable_prefix_caching: publish computed full blocks and reuse them across sequences.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks={num_blocks}: must be >= 2 (block {NULL_BLOCK_ID} is reserved)")
        if block_size < 1:
            raise ValueError(f"block_size={block_size}: must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._free_uncached: deque[int] = deque(range(NULL_BLOCK_ID + 1, num_blocks))
        self._free_cached: OrderedDict[int, None] = OrderedDict()
        self._hash_of_block: dict[int, BlockHash] = {}
        self._block_of_hash: dict[BlockHash, int] = {}
        self._tables: dict[str, list[int]] = {}
        # Per sequence, the hash chain of its leading computed full blocks.
        self._chains: dict[str, list[BlockHash]] = {}
        self.num_prefix_query_tokens = 0
        """Tokens looked up in the prefix cache by successful allocations."""
        self.num_prefix_hit_tokens = 0
        """Of those, tokens found cached."""
        self.free_cached_version = 0
        """Changes so far of the set of cached blocks no sequence holds: freed, taken again or evicted."""

    @property
    def num_usable_blocks(self) -> int:
        """Blocks that can ever be handed out (all but the null block)."""
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks held by no sequence, evictable cached ones included."""
        return len(self._free_uncached) + len(self._free_cached)

    @property
    def usage(self) -> float:
        """Fraction of the usable blocks held by at least one sequence."""
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    @property
    def prefix_hit_rate(self) -> float:
        """Cached tokens over looked-up tokens; 0 before any lookup."""
        return self.num_prefix_hit_tokens / self.num_prefix_query_tokens if self.num_prefix_query_tokens else 0.0

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    def ref_count(self, block_id: int) -> int:
        """Sequences holding ``block_id``."""
        return self._ref_counts[block_id]

    def is_cached(self, block_id: int) -> bool:
        """Whether ``block_id`` is published in the prefix cache."""
        return block_id in self._hash_of_block

    def block_table(self, seq_id: str) -> list[int]:
        """The live block table of ``seq_id``; read it, never change it."""
        return self._tables[seq_id]

    def can_allocate(self, num_tokens: int) -> bool:
        """Whether a new sequence of ``num_tokens`` tokens, with no prefix hit, would get its blocks now."""
        return self.num_blocks_for(num_tokens) <= self.num_free_blocks

    def lookup_prefix(self, token_ids: Sequence[int], earlier: PrefixHit | None = None) -> PrefixHit:
        """Find the longest run of cached full blocks that starts ``token_ids``; changes nothing.

        The block holding the last token is never a hit, so at most
        ``(len(token_ids) - 1) // block_size`` blocks are: the model must compute at least one
        token of the sequence to produce the logits of the next one. ``earlier``: a lookup of
        the same tokens with no block published since, whose blocks are then looked up again
        by their hashes (some may have been evicted), hashing nothing; ``earlier`` itself while
        no cached block has been freed, taken or evicted since.
        """
        block_ids: list[int] = []
        block_hashes: list[BlockHash] = []
        if earlier is not None:
            assert earlier.num_query_tokens == len(token_ids)
            if earlier.version == self.free_cached_version:
                return earlier
            for block_hash in earlier.block_hashes:
                block_id = self._block_of_hash.get(block_hash)
                if block_id is None:
                    break
                block_ids.append(block_id)
                block_hashes.append(block_hash)
        elif self.enable_prefix_caching:
            parent_hash = None
            for start in range(0, (len(token_ids) - 1) // self.block_size * self.block_size, self.block_size):
                block_hash = hash_block(parent_hash, token_ids[start : start + self.block_size])
                block_id = self._block_of_hash.get(block_hash)
                if block_id is None:
                    break
                block_ids.append(block_id)
                block_hashes.append(block_hash)
                parent_hash = block_hash
        num_unheld = sum(self._ref_counts[block_id] == 0 for block_id in block_ids)
        num_cached_tokens = len(block_ids) * self.block_size
        return PrefixHit(
            block_ids, block_hashes, num_cached_tokens, len(token_ids), num_unheld, self.free_cached_version
        )

    def allocate(
        self, seq_id: str, num_tokens: int, prefix_hit: PrefixHit | None = None, *, counts_as_query: bool = True
    ) -> list[int] | None:
        """Give a new sequence blocks for its first ``num_tokens`` tokens.

        The blocks of ``prefix_hit`` (from ``lookup_prefix`` just before, with no allocation in
        between) come first and gain a reference; fresh blocks follow. Returns the block table,
        or ``None`` (changing nothing) when too few blocks are free. ``counts_as_query``: the
        hit counts in ``prefix_hit_rate`` (not a preempted sequence's, which finds its own blocks).
        """
        assert seq_id not in self._tables, f"sequence {seq_id!r} already holds blocks"
        cached = prefix_hit.block_ids if prefix_hit is not None else []
        assert num_tokens >= len(cached) * self.block_size
        num_fresh = self.num_blocks_for(num_tokens) - len(cached)
        # A hit on a cached free block takes that block out of the free pool as well.
        num_revived = 0
        if prefix_hit is not None:
            assert prefix_hit.version == self.free_cached_version, "prefix hit is stale"
            num_revived = prefix_hit.num_unheld_blocks
        if num_fresh > self.num_free_blocks - num_revived:
            return None
        if prefix_hit is not None:
            for block_id, block_hash in zip(prefix_hit.block_ids, prefix_hit.block_hashes):
                assert self._hash_of_block.get(block_id) == block_hash, "prefix hit is stale"
                self._take_cached(block_id)
            self._chains[seq_id] = list(prefix_hit.block_hashes)
            if self.enable_prefix_caching and counts_as_query:
                self.num_prefix_query_tokens += prefix_hit.num_query_tokens
                self.num_prefix_hit_tokens += prefix_hit.num_cached_tokens
        else:
            self._chains[seq_id] = []
        table = list(cached) + [self._take_free() for _ in range(num_fresh)]
        self._tables[seq_id] = table
        return table

    def append_slots(self, seq_id: str, num_tokens: int) -> list[int] | None:
        """Grow ``seq_id``'s table to hold ``num_tokens`` tokens in all.

        A new block is taken only when the last one is full. Returns the table, or ``None``
        (changing nothing) when too few blocks are free.
        """
        table = self._tables[seq_id]
        num_fresh = self.num_blocks_for(num_tokens) - len(table)
        if num_fresh > self.num_free_blocks:
            return None
        table.extend(self._take_free() for _ in range(num_fresh))
        return table

    def trim(self, seq_id: str, num_tokens: int) -> None:
        """Shrink ``seq_id``'s table to its first ``num_tokens`` tokens (it grew for proposals
        that were refused). The blocks dropped hold no computed token, so none is published."""
        table = self._tables[seq_id]
        num_kept = self.num_blocks_for(num_tokens)
        for block_id in table[num_kept:]:
            assert self._ref_counts[block_id] == 1 and block_id not in self._hash_of_block, block_id
            self._ref_counts[block_id] = 0
            self._free_uncached.appendleft(block_id)
        del table[num_kept:]

    def fork(self, parent_id: str, child_id: str, num_tokens: int) -> list[int]:
        """Start ``child_id`` sharing the blocks of ``parent_id``'s first ``num_tokens`` tokens.

        ``num_tokens`` must be a whole number of blocks whose K/V the parent has computed (or
        computes in the step in flight): full blocks are shared, the partial tail never is.
        Needs no free block, so it cannot fail. Returns the child's table.
        """
        assert child_id not in self._tables, f"sequence {child_id!r} already holds blocks"
        assert num_tokens % self.block_size == 0, "only full blocks are shared"
        shared = self._tables[parent_id][: num_tokens // self.block_size]
        assert len(shared) * self.block_size == num_tokens, "the parent holds fewer tokens"
        for block_id in shared:
            self._ref_counts[block_id] += 1
        self._tables[child_id] = list(shared)
        self._chains[child_id] = self._chains[parent_id][: len(shared)]
        return self._tables[child_id]

    def cache_full_blocks(self, seq_id: str, token_ids: Sequence[int], num_computed_tokens: int) -> None:
        """Publish the full blocks among ``seq_id``'s first ``num_computed_tokens`` tokens.

        Call it once their K/V is written (after the step), never before: a hit on a block
        still being computed would read garbage. ``token_ids`` is the whole sequence so far.
        """
        if not self.enable_prefix_caching:
            return
        table, chain = self._tables[seq_id], self._chains[seq_id]
        for index in range(len(chain), num_computed_tokens // self.block_size):
            start = index * self.block_size
            block_hash = hash_block(chain[-1] if chain else None, token_ids[start : start + self.block_size])
            chain.append(block_hash)
            block_id = table[index]
            assert self._hash_of_block.get(block_id, block_hash) == block_hash
            # An identical block computed at the same time by another sequence stays
            # unpublished: one block per hash, and it returns to the uncached queue when freed.
            if block_hash not in self._block_of_hash:
                self._block_of_hash[block_hash] = block_id
                self._hash_of_block[block_id] = block_hash

    def free(self, seq_id: str) -> None:
        """Drop ``seq_id``'s references; blocks nobody holds any more return to the free pool."""
        table = self._tables.pop(seq_id)
        del self._chains[seq_id]
        # Tail first: a sequence's last blocks are the least likely to be shared by a later
        # prompt, so they become the least recently used, evicted before the prefix.
        for block_id in reversed(table):
            self._ref_counts[block_id] -= 1
            assert self._ref_counts[block_id] >= 0, f"block {block_id} freed more often than taken"
            if self._ref_counts[block_id] > 0:
                continue
            if block_id in self._hash_of_block:
                self._free_cached[block_id] = None
                self.free_cached_version += 1
            else:
                # Reused first, so that few distinct blocks are touched.
                self._free_uncached.appendleft(block_id)

    def _take_cached(self, block_id: int) -> None:
        if self._ref_counts[block_id] == 0:
            del self._free_cached[block_id]
            self.free_cached_version += 1
        self._ref_counts[block_id] += 1

    def _take_free(self) -> int:
        if self._free_uncached:
            block_id = self._free_uncached.popleft()
        else:
            block_id, _ = self._free_cached.popitem(last=False)
            del self._block_of_hash[self._hash_of_block.pop(block_id)]
            self.free_cached_version += 1
        assert block_id != NULL_BLOCK_ID and self._ref_counts[block_id] == 0
        self._ref_counts[block_id] = 1
        return block_id

"""Paged KV block allocation with reference counts and prefix caching (plain Python, no torch).

Every block is in exactly one of three states:
  free    - holds nothing useful; ref count 0
  in use  - in at least one sequence's block table; ref count > 0
  cached  - ref count 0 but holds a full, hashed block of some prompt prefix; reusable by a later
            request with the same prefix, evicted least-recently-used first when blocks run out
so free + in use + cached == total at all times.

A full block's hash chains over the whole prefix (hash of the previous block's hash and this block's
tokens), so two blocks share a hash only if every token before them is the same too.
"""
from __future__ import annotations

from collections import OrderedDict, deque


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.cached_blocks: OrderedDict[int, None] = OrderedDict()  # LRU order: oldest first
        self.hash_to_block: dict[int, int] = {}
        self.tables: dict[str, list[int]] = {}
        self.num_hashed: dict[str, int] = {}  # how many leading blocks of a table are hashed
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of those, tokens found

    # --- accounting -------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    @property
    def num_cached(self) -> int:
        return len(self.cached_blocks)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free - self.num_cached

    @property
    def num_available(self) -> int:
        """Blocks a new allocation can take: free ones plus evictable cached ones."""
        return self.num_free + self.num_cached

    @property
    def usage(self) -> float:
        return self.num_used / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def table(self, seq_id: str) -> list[int]:
        return self.tables[seq_id]

    # --- prefix cache -----------------------------------------------------------------------
    def _chain_hash(self, parent: int | None, tokens: list[int]) -> int:
        return hash((parent, tuple(tokens)))

    def match_prefix(self, token_ids: list[int]) -> list[int]:
        """Cached blocks holding the longest full-block prefix of token_ids. At least one token is
        always left uncovered: the last prompt token must be computed to get its logits."""
        if not self.enable_prefix_caching:
            return []
        matched, parent = [], None
        for start in range(0, len(token_ids) - 1 - (len(token_ids) - 1) % self.block_size, self.block_size):
            parent = self._chain_hash(parent, token_ids[start:start + self.block_size])
            block = self.hash_to_block.get(parent)
            if block is None:
                break
            matched.append(block)
        return matched

    # --- allocation -------------------------------------------------------------------------
    def can_admit(self, token_ids: list[int], num_new_tokens: int) -> bool:
        """Whether a waiting sequence could get blocks for its first num_new_tokens after its cached prefix."""
        matched = self.match_prefix(token_ids)
        # Matched blocks sitting in the cached pool stop being available once taken.
        reused_from_pool = sum(1 for b in matched if self.ref_counts[b] == 0)
        needed = self.blocks_needed(len(matched) * self.block_size + num_new_tokens) - len(matched)
        return needed <= self.num_available - reused_from_pool

    def admit(self, seq_id: str, token_ids: list[int]) -> int:
        """Start a table for a sequence, reusing its cached prefix. Returns the number of cached tokens."""
        if seq_id in self.tables:
            raise ValueError(f"sequence {seq_id!r} already has blocks")
        matched = self.match_prefix(token_ids)
        for block in matched:
            if self.ref_counts[block] == 0:
                self.cached_blocks.pop(block)
            self.ref_counts[block] += 1
        self.tables[seq_id] = list(matched)
        self.num_hashed[seq_id] = len(matched)
        if self.enable_prefix_caching:
            self.prefix_queries += len(token_ids)
            self.prefix_hits += len(matched) * self.block_size
        return len(matched) * self.block_size

    def _take_block(self) -> int:
        if self.free_blocks:
            block = self.free_blocks.popleft()
        else:
            block, _ = self.cached_blocks.popitem(last=False)  # evict the least recently used
            del self.hash_to_block[self.block_hash[block]]
            self.block_hash[block] = None
        self.ref_counts[block] = 1
        return block

    def ensure_slots(self, seq_id: str, num_tokens: int) -> bool:
        """Grow a table to hold num_tokens tokens. False (and nothing taken) if blocks are short."""
        table = self.tables[seq_id]
        needed = self.blocks_needed(num_tokens) - len(table)
        if needed > self.num_available:
            return False
        for _ in range(max(0, needed)):
            table.append(self._take_block())
        return True

    def has_new_full_block(self, seq_id: str, num_computed: int) -> bool:
        """Whether commit() has anything to hash: lets callers skip building the token list each step."""
        return self.enable_prefix_caching and num_computed // self.block_size > self.num_hashed[seq_id]

    def commit(self, seq_id: str, token_ids: list[int], num_computed: int) -> None:
        """Hash the sequence's full blocks whose K/V are now computed, so later prompts can share them."""
        if not self.enable_prefix_caching:
            return
        table, done = self.tables[seq_id], self.num_hashed[seq_id]
        parent = self.block_hash[table[done - 1]] if done else None
        for index in range(done, num_computed // self.block_size):
            block = table[index]
            start = index * self.block_size
            parent = self._chain_hash(parent, token_ids[start:start + self.block_size])
            if self.block_hash[block] is None and parent not in self.hash_to_block:
                self.block_hash[block] = parent
                self.hash_to_block[parent] = block
            elif self.block_hash[block] != parent:
                # Same content computed twice at once elsewhere: keep ours private, but stop hashing
                # this table here since its chain no longer matches a single block id sequence.
                break
            self.num_hashed[seq_id] = index + 1

    def free(self, seq_id: str) -> None:
        """Release a sequence's blocks. Hashed ones stay cached; the tail goes first in LRU order so
        that a prefix's first blocks, the most shareable, are evicted last."""
        table = self.tables.pop(seq_id, None)
        self.num_hashed.pop(seq_id, None)
        for block in reversed(table or []):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                if self.block_hash[block] is not None:
                    self.cached_blocks[block] = None
                else:
                    self.free_blocks.append(block)

    def trim(self, seq_id: str, num_tokens: int) -> None:
        """Give back the blocks a table holds beyond num_tokens tokens: slots of rejected draft tokens.
        Those blocks hold no committed (hashed) token, so they go straight back to the free list."""
        table = self.tables[seq_id]
        while len(table) > self.blocks_needed(num_tokens):
            block = table.pop()
            self.ref_counts[block] -= 1
            self.free_blocks.append(block)

    def reset_prefix_cache(self) -> None:
        for block in list(self.cached_blocks):
            del self.hash_to_block[self.block_hash[block]]
            self.block_hash[block] = None
            self.free_blocks.append(block)
        self.cached_blocks.clear()

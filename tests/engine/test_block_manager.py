"""BlockManager with plain ints: accounting, prefix matching, chained hashes, LRU eviction, ref counts."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from service.engine.block_manager import BlockManager

BS = 4


def check_invariants(bm: BlockManager) -> None:
    """Every block is in exactly one state, counted independently of num_used's own formula."""
    free, cached = list(bm.free_blocks), list(bm.cached_blocks)
    assert len(set(free)) == len(free), "a block is free twice"
    refs = Counter(b for table in bm.tables.values() for b in table)
    used = set(refs)
    assert not (set(free) & set(cached)) and not (set(free) & used) and not (set(cached) & used)
    assert len(free) + len(cached) + len(used) == bm.num_blocks
    assert bm.num_free + bm.num_used + bm.num_cached == bm.num_blocks
    assert bm.num_used == len(used)
    for block in range(bm.num_blocks):
        assert bm.ref_counts[block] == refs.get(block, 0)
    for block in cached:
        assert bm.block_hash[block] is not None and bm.hash_to_block[bm.block_hash[block]] == block
    for block in free:
        assert bm.block_hash[block] is None
    for h, block in bm.hash_to_block.items():
        assert bm.block_hash[block] == h


def admit_and_compute(bm: BlockManager, seq: str, tokens: list[int]) -> int:
    """Admit a sequence, give it slots for all its tokens, mark them computed; returns cached tokens."""
    cached = bm.admit(seq, tokens)
    assert bm.ensure_slots(seq, len(tokens))
    bm.commit(seq, tokens, len(tokens))
    return cached


def test_randomized_accounting():
    rng = random.Random(1234)
    bm = BlockManager(num_blocks=24, block_size=BS)
    prefixes = [[rng.randrange(100) for _ in range(3 * BS)] for _ in range(3)]
    seqs: dict[str, dict] = {}
    counter = 0
    for _ in range(2000):
        op = rng.choice(["admit", "grow", "commit", "free", "reset"] if seqs else ["admit"])
        if op == "admit":
            tokens = rng.choice(prefixes)[: rng.randrange(1, 3 * BS + 1)] + [rng.randrange(100)
                                                                            for _ in range(rng.randrange(0, 9))]
            num_new = rng.randrange(1, len(tokens) + 1)
            if bm.can_admit(tokens, num_new):
                counter += 1
                seq = f"s{counter}"
                cached = bm.admit(seq, tokens)
                assert cached % BS == 0 and cached < len(tokens)
                assert bm.ensure_slots(seq, cached + num_new), "can_admit promised these blocks"
                seqs[seq] = {"tokens": tokens, "slots": cached + num_new, "computed": cached}
        elif op == "grow":
            seq = rng.choice(list(seqs))
            state = seqs[seq]
            before = (bm.num_free, bm.num_cached, len(bm.table(seq)))
            target = state["slots"] + rng.randrange(1, 2 * BS)
            if bm.ensure_slots(seq, target):
                state["tokens"] += [rng.randrange(100) for _ in range(target - len(state["tokens"]))]
                state["slots"] = target
                assert len(bm.table(seq)) * BS >= target
            else:
                assert (bm.num_free, bm.num_cached, len(bm.table(seq))) == before
        elif op == "commit":
            seq = rng.choice(list(seqs))
            state = seqs[seq]
            state["computed"] = rng.randrange(state["computed"], min(state["slots"], len(state["tokens"])) + 1)
            bm.commit(seq, state["tokens"], state["computed"])
        elif op == "free":
            seq = rng.choice(list(seqs))
            del seqs[seq]
            bm.free(seq)
        elif op == "reset" and rng.random() < 0.1:
            bm.reset_prefix_cache()
        check_invariants(bm)
    for seq in list(seqs):
        bm.free(seq)
    check_invariants(bm)
    assert bm.num_used == 0
    assert bm.prefix_hits > 0, "the random walk never exercised the prefix cache"


def test_prefix_match_full_blocks_only_and_never_the_whole_prompt():
    bm = BlockManager(num_blocks=16, block_size=BS)
    tokens = list(range(3 * BS))  # exactly three full blocks
    admit_and_compute(bm, "a", tokens)
    bm.free("a")
    assert bm.num_cached == 3
    # The whole prompt is cached, but its last token must be computed: only two blocks match.
    assert len(bm.match_prefix(tokens)) == 2
    assert bm.admit("b", tokens) == 2 * BS
    bm.free("b")
    # One more token: three full blocks match, the new token is left.
    assert len(bm.match_prefix(tokens + [99])) == 3
    # A partial block never matches: the prompt's first block, then a block that differs at its end.
    assert len(bm.match_prefix(tokens[:BS] + tokens[BS:2 * BS - 1] + [77] + [5])) == 1
    # Prompts shorter than a block + 1 never match.
    assert bm.match_prefix(tokens[:BS]) == []
    assert len(bm.match_prefix(tokens[:BS + 1])) == 1
    check_invariants(bm)


def test_partial_block_is_not_cached():
    bm = BlockManager(num_blocks=8, block_size=BS)
    tokens = list(range(2 * BS + 2))
    admit_and_compute(bm, "a", tokens)
    bm.free("a")
    assert bm.num_cached == 2 and bm.num_free == 6  # the partial third block went back to free
    check_invariants(bm)


def test_hashes_chain_over_the_prefix():
    bm = BlockManager(num_blocks=16, block_size=BS)
    shared_block = [7] * BS
    admit_and_compute(bm, "a", [1] * BS + shared_block + [0])
    bm.free("a")
    # The same second block after a different first block must not match.
    assert bm.match_prefix([2] * BS + shared_block + [0]) == []
    # ... nor as a first block.
    assert bm.match_prefix(shared_block + [0]) == []
    assert len(bm.match_prefix([1] * BS + shared_block + [0])) == 2
    check_invariants(bm)


def test_lru_evicts_the_tail_of_a_freed_table_first():
    bm = BlockManager(num_blocks=4, block_size=BS)
    tokens = list(range(4 * BS))
    admit_and_compute(bm, "a", tokens)
    head = bm.table("a")
    bm.free("a")
    assert bm.num_free == 0 and bm.num_cached == 4
    # A new sequence takes one block: the evicted one is the last of the freed table.
    bm.admit("b", [1000])
    assert bm.ensure_slots("b", 1)
    assert bm.table("b") == [head[3]]
    assert len(bm.match_prefix(tokens + [0])) == 3  # the head is still cached
    assert bm.ensure_slots("b", 2 * BS)
    assert bm.table("b")[1] == head[2]
    assert len(bm.match_prefix(tokens + [0])) == 2
    check_invariants(bm)


def test_reuse_refreshes_lru_position():
    bm = BlockManager(num_blocks=4, block_size=BS)
    old = list(range(BS)) + [0]
    new = list(range(100, 100 + BS)) + [0]
    admit_and_compute(bm, "old", old)
    bm.free("old")
    admit_and_compute(bm, "new", new)
    bm.free("new")
    assert bm.num_cached == 2
    assert bm.admit("again", old) == BS  # touching "old" makes "new" the least recently used
    bm.free("again")
    bm.admit("c", [5])
    assert bm.ensure_slots("c", 2 * BS + 1)  # free blocks (2), then one eviction
    assert len(bm.match_prefix(old)) == 1 and bm.match_prefix(new) == []
    check_invariants(bm)


def test_ensure_slots_takes_nothing_when_short():
    bm = BlockManager(num_blocks=4, block_size=BS)
    bm.admit("a", [1])
    assert bm.ensure_slots("a", 3 * BS)
    bm.admit("b", [2])
    state = (list(bm.free_blocks), dict(bm.cached_blocks), list(bm.table("b")))
    assert not bm.ensure_slots("b", 2 * BS)
    assert (list(bm.free_blocks), dict(bm.cached_blocks), list(bm.table("b"))) == state
    assert bm.ensure_slots("b", BS)
    assert bm.num_free == 0
    assert bm.ensure_slots("b", BS)  # already covered: takes nothing, succeeds
    check_invariants(bm)


def test_can_admit_counts_cached_prefix_blocks_it_would_take():
    bm = BlockManager(num_blocks=3, block_size=BS)
    tokens = list(range(2 * BS)) + [0]
    admit_and_compute(bm, "a", tokens)
    bm.free("a")  # two cached blocks, one free
    # Matching both cached blocks leaves one block for the last token: fits.
    assert bm.can_admit(tokens, 1)
    # A different prompt of the same length needs three fresh blocks (two by eviction): fits.
    assert bm.can_admit([500] * len(tokens), len(tokens))
    # The matched prompt plus 2 more blocks of new tokens: the cached ones are taken, not evictable.
    assert not bm.can_admit(tokens + [1] * (2 * BS), 2 * BS + 1)
    check_invariants(bm)


def test_shared_prefix_ref_counts():
    bm = BlockManager(num_blocks=16, block_size=BS)
    prefix = list(range(2 * BS))
    admit_and_compute(bm, "a", prefix + [100, 101])
    assert admit_and_compute(bm, "b", prefix + [200]) == 2 * BS
    shared = bm.table("a")[:2]
    assert bm.table("b")[:2] == shared
    assert bm.table("a")[2] != bm.table("b")[2]
    assert [bm.ref_counts[b] for b in shared] == [2, 2]
    assert bm.num_used == 4
    bm.free("a")
    assert [bm.ref_counts[b] for b in shared] == [1, 1]
    assert bm.num_used == 3 and bm.num_cached == 0  # shared blocks still in use by b
    bm.free("b")
    assert bm.num_used == 0 and bm.num_cached == 2
    assert bm.prefix_hits == 2 * BS
    check_invariants(bm)


def test_reset_prefix_cache():
    bm = BlockManager(num_blocks=8, block_size=BS)
    admit_and_compute(bm, "live", list(range(2 * BS)) + [0])
    admit_and_compute(bm, "gone", list(range(50, 50 + 2 * BS)) + [0])
    bm.free("gone")
    assert bm.num_cached == 2
    bm.reset_prefix_cache()
    assert bm.num_cached == 0 and bm.num_used == 3 and bm.num_free == 5
    assert bm.match_prefix(list(range(50, 50 + 2 * BS)) + [0]) == []
    check_invariants(bm)
    bm.free("live")
    check_invariants(bm)
    assert bm.num_used == 0


def test_prefix_caching_disabled():
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    tokens = list(range(3 * BS))
    admit_and_compute(bm, "a", tokens)
    bm.free("a")
    assert bm.num_cached == 0 and bm.num_free == 8
    assert bm.admit("b", tokens) == 0
    check_invariants(bm)


def test_bad_arguments():
    with pytest.raises(ValueError):
        BlockManager(0, BS)
    bm = BlockManager(4, BS)
    bm.admit("a", [1])
    with pytest.raises(ValueError, match="already has blocks"):
        bm.admit("a", [1])
    bm.free("a")
    bm.free("a")  # freeing twice is harmless
    check_invariants(bm)

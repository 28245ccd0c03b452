from __future__ import annotations

import random

import pytest

from engine.block_allocator import BlockAllocator
from engine.block_hash import block_hashes, hash_block


def test_allocate_free_exact_page_ids():
    a = BlockAllocator(num_pages=6, page_size=4)
    assert a.allocate(2) == [0, 1]
    assert a.allocate(3) == [2, 3, 4]
    assert a.num_free == 1 and a.num_used == 5
    assert not a.can_allocate(2)
    with pytest.raises(RuntimeError):
        a.allocate(2)
    a.free([0, 1])  # released tail first: 1 then 0
    assert list(a.free_pages) == [5, 1, 0]
    assert a.allocate(3) == [5, 1, 0]
    a.check_integrity()


def test_refcounts_and_double_free():
    a = BlockAllocator(4, 4)
    pages = a.allocate(2)
    a.register(pages[0], 111)
    assert a.match_prefix([111, 222]) == [pages[0]]
    assert a.refcount[pages[0]] == 2
    a.free(pages)
    assert a.refcount[pages[0]] == 1 and a.num_used == 1
    a.free([pages[0]])
    assert a.refcount[pages[0]] == 0 and list(a.evictable) == [pages[0]]
    with pytest.raises(RuntimeError):
        a.free([pages[0]])
    a.check_integrity()


def test_prefix_cache_hit_and_lru_eviction_order():
    a = BlockAllocator(4, 2)
    x = a.allocate(2)  # pages 0, 1
    a.register(x[0], 10)
    a.register(x[1], 11)
    y = a.allocate(2)  # pages 2, 3
    a.register(y[0], 20)
    a.register(y[1], 21)
    a.free(x)  # evictable order: 1, 0
    a.free(y)  # then 3, 2
    assert list(a.evictable) == [1, 0, 3, 2]
    assert a.num_free == 4 and a.num_used == 0
    # A hit takes the pages out of the LRU; a miss on the second block stops the run.
    assert a.match_prefix([20, 99]) == [2]
    assert list(a.evictable) == [1, 0, 3]
    # Fresh allocations evict least recently released first.
    assert a.allocate(2) == [1, 0]
    assert a.num_evictions == 2
    assert a.lookup([10]) == [] and a.lookup([11]) == []
    assert a.lookup([20, 21]) == [2, 3]
    a.check_integrity()


def test_register_keeps_first_page_for_duplicate_hash():
    a = BlockAllocator(4, 2)
    p, q = a.allocate(2)
    a.register(p, 7)
    a.register(q, 7)
    assert a.hash_page[7] == p and q not in a.page_hash
    a.free([p, q])
    assert list(a.free_pages) == [2, 3, q] and list(a.evictable) == [p]
    a.check_integrity()


def test_reset_prefix_cache():
    a = BlockAllocator(3, 2)
    p = a.allocate(2)
    a.register(p[0], 1)
    a.free(p)
    a.reset_prefix_cache()
    assert a.num_free == 3 and not a.evictable and not a.hash_page
    a.check_integrity()


def test_chain_hash_depends_on_parent():
    toks = [1, 2, 3, 4, 1, 2, 3, 4]
    h = block_hashes(toks, 4)
    assert len(h) == 2 and h[0] != h[1]  # same tokens, different parents
    assert h[1] == hash_block(h[0], [1, 2, 3, 4])
    assert block_hashes(toks + [9], 4) == h  # partial blocks are not hashed
    assert block_hashes(toks, 4, start=h[:1]) == h


def test_integrity_under_random_operations():
    rng = random.Random(1234)
    a = BlockAllocator(64, 4)
    held: list[list[int]] = []
    next_hash = 0
    for _ in range(5000):
        op = rng.random()
        if op < 0.35 and a.can_allocate(n := rng.randint(1, 6)):
            held.append(a.allocate(n))
        elif op < 0.5 and held:  # append a page to a sequence
            if a.can_allocate(1):
                rng.choice(held).extend(a.allocate(1))
        elif op < 0.65 and held:
            seq = rng.choice(held)
            next_hash += 1
            a.register(rng.choice(seq), rng.choice([next_hash, rng.randint(1, next_hash)]))
        elif op < 0.8 and a.hash_page:
            hashes = rng.sample(sorted(a.hash_page), k=min(3, len(a.hash_page)))
            pages = a.match_prefix(hashes)
            if pages:
                held.append(pages)
        elif held:
            a.free(held.pop(rng.randrange(len(held))))
        a.check_integrity()
        assert a.num_used == len({p for s in held for p in s})
    for seq in held:
        a.free(seq)
    a.check_integrity()
    assert a.num_used == 0 and a.num_free == 64


def test_cached_prefix_tokens_counts_the_leading_cached_pages_and_takes_nothing():
    from engine.kv_manager import KVManager

    alloc = BlockAllocator(8, 2)
    kv = KVManager(alloc, enable_prefix_caching=True)
    tokens = [5, 6, 7, 8, 9, 10, 11]  # 3 full blocks of 2, and 1 token
    hashes = block_hashes(tokens, 2)
    pages = alloc.allocate(2)
    alloc.register(pages[0], hashes[0])
    alloc.register(pages[1], hashes[1])
    alloc.free(pages)  # cached, evictable
    assert kv.cached_prefix_tokens(tokens) == 4  # blocks 0 and 1; block 2 is not cached
    assert kv.cached_prefix_tokens([5, 6, 0, 0]) == 2  # the run stops at the first miss
    assert kv.cached_prefix_tokens([7, 8, 9, 10]) == 0  # block 1's tokens, but another parent
    assert sorted(alloc.evictable) == pages and alloc.num_used == 0  # no reference taken
    assert KVManager(alloc, enable_prefix_caching=False).cached_prefix_tokens(tokens) == 0
    alloc.check_integrity()

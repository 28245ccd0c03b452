"""Page allocator with refcounts and an automatic prefix cache.

Contract:
- Pages are ints in [0, num_pages). A page is *free* (refcount 0, no hash), *used*
  (refcount > 0) or *cached* (refcount 0, holds a full block under its chain hash, evictable).
- `can_allocate(n)` / `allocate(n)`: fresh pages come from the free list first, then by
  evicting the least recently released cached page. `allocate` raises when `can_allocate` is False.
- `match_prefix(hashes)` returns the pages of the longest cached run of leading block hashes and
  takes a reference on each; `free(pages)` drops one reference per page.
- `register(page, hash)` marks a used page as holding that full block, so later requests can
  share it. A hash already held by another page is left with that page.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable


class BlockAllocator:
    def __init__(self, num_pages: int, page_size: int) -> None:
        self.num_pages = num_pages
        self.page_size = page_size
        self.refcount = [0] * num_pages
        self.free_pages: deque[int] = deque(range(num_pages))
        self.page_hash: dict[int, int] = {}
        self.hash_page: dict[int, int] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached pages, LRU first
        self.num_evictions = 0

    # -- queries -------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Pages an allocation can take now (free + evictable cached)."""
        return len(self.free_pages) + len(self.evictable)

    @property
    def num_used(self) -> int:
        return self.num_pages - self.num_free

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def lookup(self, hashes: Iterable[int]) -> list[int]:
        """Pages of the longest cached run of leading hashes, without taking references (the
        hashes are read in order, none after the first miss)."""
        pages = []
        for h in hashes:
            page = self.hash_page.get(h)
            if page is None:
                break
            pages.append(page)
        return pages

    # -- actions -------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        if not self.can_allocate(n):
            raise RuntimeError(f"cannot allocate {n} pages: only {self.num_free} available")
        pages = []
        for _ in range(n):
            if self.free_pages:
                page = self.free_pages.popleft()
            else:
                page, _ = self.evictable.popitem(last=False)
                del self.hash_page[self.page_hash.pop(page)]
                self.num_evictions += 1
            self.refcount[page] = 1
            pages.append(page)
        return pages

    def match_prefix(self, hashes: list[int]) -> list[int]:
        pages = self.lookup(hashes)
        for page in pages:
            if self.refcount[page] == 0:
                del self.evictable[page]
            self.refcount[page] += 1
        return pages

    def register(self, page: int, block_hash: int) -> None:
        if self.refcount[page] <= 0:
            raise RuntimeError(f"register on page {page} that is not in use")
        if block_hash in self.hash_page or page in self.page_hash:
            return
        self.hash_page[block_hash] = page
        self.page_hash[page] = block_hash

    def free(self, pages: list[int]) -> None:
        # Released in reverse so that a request's tail pages are evicted before its head:
        # the head is the part other requests are most likely to share.
        for page in reversed(pages):
            if self.refcount[page] <= 0:
                raise RuntimeError(f"double free of page {page}")
            self.refcount[page] -= 1
            if self.refcount[page] == 0:
                if page in self.page_hash:
                    self.evictable[page] = None
                else:
                    self.free_pages.append(page)

    def reset_prefix_cache(self) -> None:
        """Forget every cached block that no request uses."""
        for page in list(self.evictable):
            del self.hash_page[self.page_hash.pop(page)]
            self.free_pages.append(page)
        self.evictable.clear()

    def check_integrity(self) -> None:
        free = set(self.free_pages)
        assert len(free) == len(self.free_pages), "duplicate page in free list"
        for page in range(self.num_pages):
            rc = self.refcount[page]
            assert rc >= 0, f"page {page} refcount {rc}"
            in_free, in_evict = page in free, page in self.evictable
            if rc > 0:
                assert not in_free and not in_evict, f"used page {page} is also free/evictable"
            else:
                assert in_free != in_evict, f"page {page} with refcount 0 must be free xor cached"
                assert in_evict == (page in self.page_hash), f"page {page} cache state mismatch"
        assert len(self.page_hash) == len(self.hash_page)
        for page, h in self.page_hash.items():
            assert self.hash_page[h] == page, f"hash index broken for page {page}"

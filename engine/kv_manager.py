"""KVManager: the one place where a request's KV pages are taken, shared through the prefix cache
and given back. The scheduler owns one; nothing else touches the allocator.

Contract (pages are ints; a request's pages are `req.block_table`, in token order):
- `cached_prefix_tokens(token_ids)`: how many leading tokens a request would find cached now;
  takes nothing.
- `match_prefix(req, max_blocks)`: a request holding no pages takes a reference on the cached
  pages of its longest run of leading full blocks (at most `max_blocks`) and counts those
  tokens as computed. The one prefix-cache lookup, for local prefill and for KV imports alike.
- `can_grow(req, n)` / `grow(req, n)`: the check/act pair that gives `req` pages for `n` more
  tokens; `grow` raises when `can_grow` is False.
- `cache_blocks(req, before, end)`: after tokens [before, end) were written (end defaults to
  num_computed_tokens), their full blocks become findable by later requests. Their ids must be
  known: with overlapped scheduling `num_computed_tokens` runs ahead of the known tokens.
- `free(req)`: drops the request's references and resets its progress to zero.
- `check_integrity(live)`: the allocator's own invariants, plus: every page's refcount equals
  the number of live requests (those that hold pages now) that list it.
Plain data in, plain data out: no torch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from engine.block_allocator import BlockAllocator
from engine.block_hash import block_hashes, iter_block_hashes
from engine.request import Request


class KVManager:
    def __init__(self, allocator: BlockAllocator, enable_prefix_caching: bool) -> None:
        self.allocator = allocator
        self.page_size = allocator.page_size
        self.enable_prefix_caching = enable_prefix_caching

    # -- queries -------------------------------------------------------------------------
    @property
    def num_pages(self) -> int:
        return self.allocator.num_pages

    @property
    def num_used(self) -> int:
        """Pages referenced by requests (cached-but-unused prefix pages do not count)."""
        return self.allocator.num_used

    @property
    def num_cached(self) -> int:
        """Pages that hold a cached block and no request uses (evictable)."""
        return len(self.allocator.evictable)

    def cached_prefix_tokens(self, token_ids: list[int]) -> int:
        """How many leading tokens of `token_ids` the prefix cache holds now (whole pages).
        Takes nothing. A hint when called from another thread than the engine's: the pages
        may be evicted, or more cached, by the time a request for these tokens runs."""
        if not self.enable_prefix_caching:
            return 0
        # The hashes come one block at a time and the lookup stops at the first miss: a new
        # prompt costs one hash.
        return len(self.allocator.lookup(iter_block_hashes(token_ids, self.page_size))) \
            * self.page_size

    def pages_needed(self, req: Request, n: int) -> int:
        total = -(-(req.num_computed_tokens + n) // self.page_size)
        return max(0, total - len(req.block_table))

    def can_grow(self, req: Request, n: int) -> bool:
        return self.allocator.can_allocate(self.pages_needed(req, n))

    # -- actions -------------------------------------------------------------------------
    def grow(self, req: Request, n: int) -> None:
        req.block_table += self.allocator.allocate(self.pages_needed(req, n))

    def match_prefix(self, req: Request, max_blocks: int) -> int:
        """Share the cached leading blocks of req's tokens; returns how many were found."""
        assert not req.block_table, f"{req.request_id} already holds pages"
        if not self.enable_prefix_caching:
            return 0
        req.block_hashes = block_hashes(req.all_token_ids, self.page_size, req.block_hashes)
        pages = self.allocator.match_prefix(req.block_hashes[:max_blocks])
        req.block_table = pages
        req.num_computed_tokens = len(pages) * self.page_size
        req.num_cached_tokens = max(req.num_cached_tokens, req.num_computed_tokens)
        return len(pages)

    def cache_blocks(self, req: Request, before: int, end: int | None = None) -> None:
        if not self.enable_prefix_caching:
            return
        end = req.num_computed_tokens if end is None else end
        first, last = before // self.page_size, end // self.page_size
        if last <= first:
            return
        req.block_hashes = block_hashes(req.all_token_ids, self.page_size, req.block_hashes)
        for i in range(first, last):
            self.allocator.register(req.block_table[i], req.block_hashes[i])

    def free(self, req: Request) -> None:
        if req.block_table:
            self.allocator.free(req.block_table)
        req.block_table = []
        req.num_computed_tokens = 0

    def reset_prefix_cache(self) -> None:
        self.allocator.reset_prefix_cache()

    def check_integrity(self, live: Iterable[Request]) -> None:
        self.allocator.check_integrity()
        held = Counter(page for req in live for page in req.block_table)
        for page, rc in enumerate(self.allocator.refcount):
            assert rc == held[page], (f"page {page} has refcount {rc} but {held[page]} live "
                                      f"requests hold it")

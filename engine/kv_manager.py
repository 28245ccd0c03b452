"""KVManager: the one place where a request's KV pages are taken, shared through the prefix cache
and given back. The scheduler owns one; nothing else touches the allocator.

Contract (pages are ints; a request's pages are `req.block_table`, in token order):
- `cached_prefix_tokens(token_ids, hashes)`: how many leading tokens a request would find cached
  now (`hashes`: the tokens' block hashes, where the caller has them); takes nothing.
- `match_prefix(req, max_blocks)`: a request holding no pages takes a reference on the cached
  pages of its longest run of leading full blocks (at most `max_blocks`) and counts those
  tokens as computed. The one prefix-cache lookup, for local prefill and for KV imports alike.
- `can_grow(req, n)` / `grow(req, n)`: the check/act pair that gives `req` pages for `n` more
  tokens; `grow` raises when `can_grow` is False.
- `cache_blocks(req, before, end)`: after tokens [before, end) were written (end defaults to
  num_computed_tokens), their full blocks become findable by later requests. Their ids must be
  known: with overlapped scheduling `num_computed_tokens` runs ahead of the known tokens.
- `claim(req)` / `computed_elsewhere(req, max_blocks)`: blocks being computed. A request that
  starts to compute its prompt claims its full blocks past the cached ones, until they are
  cached (or it lets its pages go); another request whose next block is under such a claim
  waits for it (`computed_elsewhere`, which takes nothing) rather than compute the same block
  beside it.
- `free(req)`: drops the request's references and claims, and resets its progress to zero.
- `check_integrity(live)`: the allocator's own invariants, plus: every page's refcount equals
  the number of live requests (those that hold pages now) that list it, and only live requests
  hold claims.
Plain data in, plain data out: no torch.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable

from engine.block_allocator import BlockAllocator
from engine.block_hash import block_hashes, iter_block_hashes
from engine.request import Request


class KVManager:
    def __init__(self, allocator: BlockAllocator, enable_prefix_caching: bool) -> None:
        self.allocator = allocator
        self.page_size = allocator.page_size
        self.enable_prefix_caching = enable_prefix_caching
        # Claimed blocks not cached yet: hash -> the request computing it, and per request its
        # claimed hashes in block order (blocks are cached in that order).
        self.computing: dict[int, str] = {}
        self.claims: dict[str, deque[int]] = {}

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

    def cached_prefix_tokens(self, token_ids: list[int],
                             hashes: list[int] | None = None) -> int:
        """How many leading tokens of `token_ids` the prefix cache holds now (whole pages).
        Takes nothing. A hint when called from another thread than the engine's: the pages
        may be evicted, or more cached, by the time a request for these tokens runs."""
        if not self.enable_prefix_caching:
            return 0
        # Without `hashes`, they come one block at a time and the lookup stops at the first
        # miss: a new prompt costs one hash.
        if hashes is None:
            hashes = iter_block_hashes(token_ids, self.page_size)
        return len(self.allocator.lookup(hashes)) * self.page_size

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
        claims = self.claims.get(req.request_id)
        while claims and claims[0] in self.allocator.hash_page:
            del self.computing[claims.popleft()]
        if claims is not None and not claims:
            del self.claims[req.request_id]

    def claim(self, req: Request) -> None:
        """req, holding its cached prefix pages (`match_prefix`), is about to compute the rest."""
        if not self.enable_prefix_caching or req.request_id in self.claims:
            return
        first, last = len(req.block_table), req.num_prompt_tokens // self.page_size
        mine = [h for h in req.block_hashes[first:last] if h not in self.computing]
        for h in mine:
            self.computing[h] = req.request_id
        if mine:
            self.claims[req.request_id] = deque(mine)

    def computed_elsewhere(self, req: Request, max_blocks: int) -> bool:
        """Whether another request computes the block after the cached prefix that req, holding
        no pages, would find (at most `max_blocks` blocks). Takes nothing: a request that
        waits for such a block holds no references meanwhile."""
        if not self.computing:
            return False
        req.block_hashes = block_hashes(req.all_token_ids, self.page_size, req.block_hashes)
        i = len(self.allocator.lookup(req.block_hashes[:max_blocks]))
        owner = self.computing.get(req.block_hashes[i]) if i < len(req.block_hashes) else None
        return owner is not None and owner != req.request_id

    def free(self, req: Request) -> None:
        if req.block_table:
            self.allocator.free(req.block_table)
        req.block_table = []
        req.num_computed_tokens = 0
        for h in self.claims.pop(req.request_id, ()):
            del self.computing[h]

    def reset_prefix_cache(self) -> None:
        self.allocator.reset_prefix_cache()

    def check_integrity(self, live: Iterable[Request]) -> None:
        self.allocator.check_integrity()
        held = Counter(page for req in live for page in req.block_table)
        for page, rc in enumerate(self.allocator.refcount):
            assert rc == held[page], (f"page {page} has refcount {rc} but {held[page]} live "
                                      f"requests hold it")
        ids = {req.request_id for req in live}
        assert self.claims.keys() <= ids, f"claims of gone requests: {self.claims.keys() - ids}"
        assert self.computing == {h: rid for rid, hs in self.claims.items() for h in hs}, \
            "claimed blocks out of sync"

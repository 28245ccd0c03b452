"""ImportsInFlight: the prompt blocks that a decode replica is importing now, by chain hash, so
that a request whose prompt shares them waits for them instead of fetching them again.

Requests on a new shared prefix often come together: a burst on one system prompt, which the
prefix-affine router (docs/routing.md) sends to one decode replica, or the choices of one
prompt. The first reserves pages and fetches its whole prompt. Each of the others, finding no
page of it in the prefix cache yet, would fetch the prefix too (the prefill replica computing
it once each), and keep a copy of its own, which cascade attention cannot share. Instead they
wait until the first one's pages are in the prefix cache (its admission), then reserve: the
prefix is found there, and only their own blocks are fetched, or prefilled on the decode
replica itself (`decode.local_prefill_max_tokens`).

Contract (all on the replica's event loop):
- `add(hashes)` once a request has reserved pages, with the chain hashes of the blocks it
  imports (past those it found cached): returns its entry. A hash that another request already
  imports stays that request's.
- `done(entry)` once those blocks are in the prefix cache, or will not be (the import failed,
  the request was aborted): whoever waits on the entry wakes. A second call does nothing.
- `blocking(prompt_ids, page_size, cached_tokens)`: the entry importing the deepest block of the
  prompt past its `cached_tokens` (the prefix cache's hint), where every block between is being
  imported too; None when the first block past the cached ones is not. It hashes the cached
  blocks and one more for a prompt that shares nothing with an import, none while nothing is in
  flight.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from engine.block_hash import iter_block_hashes


@dataclass(eq=False)
class Import:
    """One request's blocks in flight; `landed` is set once `done` is called."""

    hashes: list[int]
    landed: asyncio.Event = field(default_factory=asyncio.Event)


class ImportsInFlight:
    def __init__(self) -> None:
        self._by_hash: dict[int, Import] = {}

    def __len__(self) -> int:
        """Blocks in flight."""
        return len(self._by_hash)

    def add(self, hashes: list[int]) -> Import:
        entry = Import([h for h in hashes if h not in self._by_hash])
        for h in entry.hashes:
            self._by_hash[h] = entry
        return entry

    def done(self, entry: Import) -> None:
        if entry.landed.is_set():
            return
        for h in entry.hashes:
            del self._by_hash[h]
        entry.landed.set()

    def blocking(self, prompt_ids: list[int], page_size: int, cached_tokens: int,
                 ) -> Import | None:
        if not self._by_hash:
            return None
        deepest = None
        for i, h in enumerate(iter_block_hashes(prompt_ids, page_size)):
            if i < cached_tokens // page_size:
                continue  # a chain hash names the whole prefix: the walk must pass these
            entry = self._by_hash.get(h)
            if entry is None:
                break
            deepest = entry
        return deepest

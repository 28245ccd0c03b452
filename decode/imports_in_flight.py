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
- `add(hashes)` as a request sets out to fetch its prompt, with the chain hashes of its full
  blocks past those the prefix cache holds, before it awaits anything after looking there (so
  that requests which came together see each other): returns its claim. A hash that another
  request claimed stays that request's.
- `done(claim)` once those blocks are in the prefix cache (the request was admitted), or will
  not be (the import failed, the request ended): whoever waits on the claim wakes. A second
  call does nothing.
- `blocking(hashes, cached_blocks)`: for a prompt of these block hashes, the claim on its deepest
  block past its `cached_blocks` (the prefix cache's hint), where every block between is claimed
  too, and how many leading blocks of the prompt that makes cached once the claims land; None
  when the first block past the cached ones is not claimed.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field


@dataclass(eq=False)
class Claim:
    """One request's blocks in flight; `landed` is set once `done` is called."""

    hashes: list[int]
    landed: asyncio.Event = field(default_factory=asyncio.Event)


class ImportsInFlight:
    def __init__(self) -> None:
        self._by_hash: dict[int, Claim] = {}

    def __len__(self) -> int:
        """Blocks in flight."""
        return len(self._by_hash)

    def add(self, hashes: list[int]) -> Claim:
        claim = Claim([h for h in hashes if h not in self._by_hash])
        for h in claim.hashes:
            self._by_hash[h] = claim
        return claim

    def done(self, claim: Claim) -> None:
        if claim.landed.is_set():
            return
        for h in claim.hashes:
            del self._by_hash[h]
        claim.landed.set()

    def blocking(self, hashes: list[int], cached_blocks: int) -> tuple[Claim, int] | None:
        deepest = None
        for i in range(cached_blocks, len(hashes)):
            claim = self._by_hash.get(hashes[i])
            if claim is None:
                break
            deepest = claim, i + 1
        return deepest

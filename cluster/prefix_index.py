"""Which decode replica most likely holds a prompt's prefix pages: the choice logic of the
prefix-affine request router (cluster/prefix_router.py), as plain data so it is tested exactly.

The index is the router's memory, not the replicas' truth: it maps the chain hash of each full
prompt page (engine/block_hash.py, the same hashes the decode replicas key their prefix cache
by) to the replicas that requests with that prefix were sent to, most recent last. A chain
hash names the whole prefix up to its page, so one lookup per page finds the longest prefix a
replica was sent. Bounded: past `max_entries` hashes the least recently used go, deepest pages
of old prompts first (they are touched last-to-first, so a prompt's first pages, the ones other
prompts share, stay longest). No replica changes needed; a replica that evicted a prefix under
KV pressure simply pays one transfer and is recorded again.

Choice, for the replicas that can take the request and their loads (requests in flight):
1. among replicas that matched at least one page and are within `max_imbalance` of the least
   loaded replica: the longest match, then the lower load, then the name;
2. otherwise (no match, or every match past the bound): the least loaded, then the fewest
   index entries (a fresh replica draws new prefixes), then the name.
The rest follow by load, so the caller can fall through when the first one refuses. Under a
hot prefix the bound spreads it: once its replica runs `max_imbalance` ahead, the overflow goes
to the least loaded one, which is recorded as holding the prefix too, and from then on the two
share it by load, each having paid the transfer once.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Generic, TypeVar

from engine.block_hash import block_hashes

R = TypeVar("R", bound=Hashable)  # a replica's id: ReplicaID under Serve, str in tests

# Replicas kept per page: a hot prefix is spread over at most this many before the oldest
# holder is forgotten (it keeps its pages until its own cache evicts them).
MAX_HOLDERS = 8


class PrefixIndex(Generic[R]):
    def __init__(self, page_size: int, max_entries: int = 200_000, max_imbalance: int = 4,
                 ) -> None:
        if page_size < 1 or max_entries < 1 or max_imbalance < 0:
            raise ValueError("page_size and max_entries must be >= 1, max_imbalance >= 0")
        self.page_size, self.max_entries, self.max_imbalance = (page_size, max_entries,
                                                                max_imbalance)
        self._holders: OrderedDict[int, list[R]] = OrderedDict()  # chain hash -> replicas
        self._entries: dict[R, int] = {}  # replica -> pages recorded for it

    def hashes(self, prompt_ids: Sequence[int]) -> list[int]:
        return block_hashes(list(prompt_ids), self.page_size)

    def __len__(self) -> int:
        return len(self._holders)

    def entries(self, replica: R) -> int:
        return self._entries.get(replica, 0)

    def matches(self, hashes: Sequence[int], replicas: Iterable[R]) -> dict[R, int]:
        """Pages of the longest recorded prefix per replica (0: none)."""
        depth = dict.fromkeys(replicas, 0)
        left = len(depth)
        for i in range(len(hashes) - 1, -1, -1):  # deepest first: stop once all are found
            if not left:
                break
            for r in self._holders.get(hashes[i], ()):
                if depth.get(r) == 0:
                    depth[r] = i + 1
                    left -= 1
        return depth

    def rank(self, hashes: Sequence[int], loads: Mapping[R, int]) -> list[R]:
        """`loads`' replicas, best first (see the module docstring)."""
        if not loads:
            return []
        depth = self.matches(hashes, loads)
        least = min(loads.values())
        affine = [r for r in loads if depth[r] > 0 and loads[r] <= least + self.max_imbalance]
        if affine:
            first = min(affine, key=lambda r: (-depth[r], loads[r], str(r)))
        else:
            first = min(loads, key=lambda r: (loads[r], self.entries(r), str(r)))
        rest = sorted((r for r in loads if r != first),
                      key=lambda r: (loads[r], -depth[r], self.entries(r), str(r)))
        return [first, *rest]

    def record(self, hashes: Sequence[int], replica: R) -> None:
        """`replica` was sent a prompt with these pages: it now (likely) holds them."""
        for h in reversed(hashes):  # first pages touched last: most recently used
            holders = self._holders.get(h)
            if holders is None:
                holders = self._holders[h] = []
            else:
                self._holders.move_to_end(h)
            if holders and holders[-1] == replica:
                continue
            if replica in holders:
                holders.remove(replica)
            else:
                self._entries[replica] = self._entries.get(replica, 0) + 1
                if len(holders) >= MAX_HOLDERS:
                    self._forget(holders.pop(0))
            holders.append(replica)
        while len(self._holders) > self.max_entries:
            _, holders = self._holders.popitem(last=False)
            for r in holders:
                self._forget(r)

    def retain(self, replicas: Iterable[R]) -> None:
        """Drop every replica not in `replicas` (they left: scale-down, death, re-deploy)."""
        keep = set(replicas)
        if all(r in keep for r in self._entries):
            return
        for h in list(self._holders):
            holders = [r for r in self._holders[h] if r in keep]
            if holders:
                self._holders[h] = holders
            else:
                del self._holders[h]
        self._entries = {r: n for r, n in self._entries.items() if r in keep}

    def _forget(self, replica: R) -> None:
        n = self._entries.get(replica, 0) - 1
        if n > 0:
            self._entries[replica] = n
        else:
            self._entries.pop(replica, None)

"""Cascade planning: find decode requests that share physical prefix pages.

The prefix cache makes requests with a common prompt prefix point at the same pages. For such a
group, attention over the shared pages can be computed once for all its queries (one pass over
the prefix instead of one per request) and merged with each request's own suffix by LSE.
Plain Python over page lists: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CascadeGroup:
    members: list[int]  # indices into the batch
    num_shared_pages: int


@dataclass
class CascadePlan:
    order: list[int]  # batch indices, grouped requests first and contiguous
    groups: list[CascadeGroup]

    @property
    def num_cascade_reqs(self) -> int:
        return sum(len(g.members) for g in self.groups)


# Measured rule (docs/benchmarks.md): cascade wins when the prefix reads it saves are large.
# Cost model in tokens of KV read: plain = sum(kv_len); cascade = shared + sum(suffix) plus a
# fixed overhead per group (an extra kernel pass and the merge).
MIN_GROUP_SIZE = 4
MIN_SAVED_TOKENS = 65536


def cascade_pays(group_size: int, shared_tokens: int, mode: str) -> bool:
    if mode == "off" or group_size < 2 or shared_tokens == 0:
        return False
    if mode == "on":
        return True
    return group_size >= MIN_GROUP_SIZE and (group_size - 1) * shared_tokens >= MIN_SAVED_TOKENS


def plan_cascade(block_tables: list[list[int]], kv_lens: list[int], page_size: int,
                 mode: str = "auto") -> CascadePlan | None:
    """Group decode requests by shared leading pages; None when no group is worth a cascade.

    A shared page must be full and must not hold any request's newest token (that token's KV
    is written this step into a page of the request's own), so each member keeps a suffix of
    at least one token.
    """
    if mode == "off":
        return None
    by_first: dict[int, list[int]] = {}
    for i, table in enumerate(block_tables):
        if table:
            by_first.setdefault(table[0], []).append(i)
    groups = []
    for members in by_first.values():
        if len(members) < 2:
            continue
        limit = min((kv_lens[i] - 1) // page_size for i in members)
        first = block_tables[members[0]]
        shared = 0
        while shared < limit and all(block_tables[i][shared] == first[shared] for i in members):
            shared += 1
        if cascade_pays(len(members), shared * page_size, mode):
            groups.append(CascadeGroup(members, shared))
    if not groups:
        return None
    grouped = {i for g in groups for i in g.members}
    order = [i for g in groups for i in g.members]
    order += [i for i in range(len(block_tables)) if i not in grouped]
    return CascadePlan(order, groups)

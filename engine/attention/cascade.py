"""Cascade planning: find decode requests that share physical prefix pages.

The prefix cache makes requests with a common prompt prefix point at the same pages. For such a
group, attention over the shared pages can be computed once for all its queries (one pass over
the prefix instead of one per request) and merged with each request's own suffix by LSE.
Numpy over block-table rows (engine/block_table.py): no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from engine.block_table import PageRows, as_page_rows


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


@dataclass(frozen=True)
class CascadeRule:
    """`auto`'s rule: cascade a group when it is large and the prefix reads it saves,
    (group - 1) * shared tokens, are many. Its cost is not a few extra launches: the shared
    level is attention of all the group's queries over the prefix (compute-bound: ~2 TFLOP per
    step for 128 x 32K at Llama-3-8B shape), and with GQA 8 x 128 plain decode reads a shared
    prefix largely from L2."""

    min_group_size: int
    min_saved_tokens: int

    def pays(self, group_size: int, shared_tokens: int) -> bool:
        return (group_size >= self.min_group_size
                and (group_size - 1) * shared_tokens >= self.min_saved_tokens)


# Calibrated on whole Llama-3-8B engine steps, H200, cascade steps replaying CUDA graphs (run 31
# of docs/benchmarks.md, `python -m bench.gpu_cascade engine`): plain decode was faster only at
# 16 x 2K (saving 31K tokens, by 4%); cascade at 64 x 2K and 16 x 8K (122K-129K, by 9-13%) and
# everything larger (253K-4M, 1.2-4.5x). Every min_group_size in 2..16 with min_saved_tokens in
# 32,768..65,536 picks the faster path in all ten cases: the middle of that range.
AUTO_RULE = CascadeRule(min_group_size=8, min_saved_tokens=49_152)


def cascade_pays(group_size: int, shared_tokens: int, mode: str,
                 rule: CascadeRule = AUTO_RULE) -> bool:
    if mode == "off" or group_size < 2 or shared_tokens == 0:
        return False
    if mode == "on":
        return True
    return rule.pays(group_size, shared_tokens)


def plan_cascade(block_tables: PageRows | Sequence[Sequence[int]], kv_lens: Sequence[int],
                 page_size: int, mode: str = "auto") -> CascadePlan | None:
    """Group decode requests by shared leading pages; None when no group is worth a cascade.

    A shared page must be full and must not hold any request's newest token (that token's KV
    is written this step into a page of the request's own), so each member keeps a suffix of
    at least one token.
    """
    if mode == "off":
        return None
    tables = as_page_rows(block_tables)
    firsts = tables.table[tables.rows, 0].tolist()  # [B]; garbage where a table is empty
    lens = tables.lens.tolist()
    by_first: dict[int, list[int]] = {}
    for i, (page, n) in enumerate(zip(firsts, lens)):
        if n:
            by_first.setdefault(page, []).append(i)
    groups = []
    for members in by_first.values():
        if len(members) < 2:
            continue
        limit = min(min((kv_lens[i] - 1) // page_size, lens[i]) for i in members)
        shared = _common_prefix(tables.table[tables.rows[members], :limit])
        if cascade_pays(len(members), shared * page_size, mode):
            groups.append(CascadeGroup(members, shared))
    if not groups:
        return None
    grouped = {i for g in groups for i in g.members}
    order = [i for g in groups for i in g.members]
    order += [i for i in range(len(tables)) if i not in grouped]
    return CascadePlan(order, groups)


def _common_prefix(rows: np.ndarray) -> int:
    """Length of the longest prefix that all rows [m, limit] share (one vectorized compare)."""
    differs = (rows != rows[0]).any(axis=0)  # [limit]
    return int(differs.argmax()) if differs.any() else rows.shape[1]

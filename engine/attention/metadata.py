"""Builds the per-step AttentionMetadata from block-table rows (once per step, not per layer).

Numpy over `PageRows`: no Python loop runs per page or per token (page runs are copied one
slice per request, positions and slots are arange arithmetic), so the host cost stays flat as
contexts grow. Over Python lists, a decode step of 128 x 2K pages spent ~26 ms here while the
GPU waited, and a prefill chunk paid a Python operation per token.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from engine.attention.base import AttentionMetadata, CascadeLevel
from engine.attention.cascade import CascadePlan
from engine.block_table import PageRows, as_page_rows


def _last_len(kv_lens: np.ndarray, page_size: int) -> np.ndarray:
    return np.where(kv_lens > 0, (kv_lens - 1) % page_size + 1, 0)


def _indptr(counts: np.ndarray) -> np.ndarray:
    out = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=out[1:])
    return out


def _gather(table: np.ndarray, rows: np.ndarray, start: np.ndarray,
            count: np.ndarray) -> np.ndarray:
    """Concatenation over b of `table[rows[b], start[b]:start[b] + count[b]]` -> [sum(count)].

    One slice per request (a C copy of its run of pages), not a [B, max_pages] mask: the mask
    and its gathered block are megabytes of temporaries at 128 x 2K pages, which cost 3-8x more
    (0.6-1.8 ms against 0.1-0.2 ms here, depending on whether malloc recycles them or the
    kernel hands out fresh pages).
    """
    ends = (start + count).tolist()
    runs = [table[r, s:e] for r, s, e in zip(rows.tolist(), start.tolist(), ends)]
    return np.concatenate(runs) if runs else np.zeros(0, dtype=np.int32)


def _dev(values: np.ndarray, dtype: np.dtype, device: torch.device) -> torch.Tensor:
    # A fresh host array each time (never a view of the mirror, which changes next step); the
    # copy from pageable memory is done with it before `.to` returns.
    return torch.from_numpy(np.ascontiguousarray(values, dtype=dtype)).to(device,
                                                                        non_blocking=True)


def build_metadata(block_tables: PageRows | Sequence[Sequence[int]], num_computed: Sequence[int],
                   num_new: Sequence[int], page_size: int, device: torch.device,
                   cascade: CascadePlan | None = None) -> AttentionMetadata:
    """Requests in batch order (already reordered for cascade when `cascade` is given)."""
    tables = as_page_rows(block_tables)
    done = np.asarray(num_computed, dtype=np.int64)  # [B]
    new = np.asarray(num_new, dtype=np.int64)  # [B]
    kv_lens = done + new  # [B]
    num_pages = -(-kv_lens // page_size)  # [B]
    if (num_pages > tables.lens).any():
        raise ValueError("a block table holds fewer pages than its request's KV needs")
    qo_indptr = _indptr(new)  # [B+1]
    kv_indptr = _indptr(num_pages)  # [B+1]
    # [nnz_pages]: each request's first num_pages[b] pages, in batch order
    kv_indices = _gather(tables.table, tables.rows, np.zeros_like(num_pages), num_pages)
    # New token t of request b sits at position done[b] + (t - qo_indptr[b]).
    owner = np.repeat(np.arange(len(new)), new)  # [T]
    positions = np.arange(qo_indptr[-1]) + (done - qo_indptr[:-1])[owner]  # [T]
    pages = tables.table[tables.rows[owner], positions // page_size]  # [T]
    slots = pages.astype(np.int64) * page_size + positions % page_size  # [T]
    levels = None
    if cascade is not None:
        levels = _cascade_levels(tables, kv_lens, page_size, cascade, device)
    return AttentionMetadata(
        qo_indptr=_dev(qo_indptr, np.int32, device),
        kv_indptr=_dev(kv_indptr, np.int32, device),
        kv_indices=_dev(kv_indices, np.int32, device),
        kv_last_page_len=_dev(_last_len(kv_lens, page_size), np.int32, device),
        slot_mapping=_dev(slots, np.int64, device),
        positions=_dev(positions, np.int64, device),
        page_size=page_size,
        num_decode_only=bool((new == 1).all()),
        qo_indptr_host=qo_indptr.tolist(),
        kv_lens_host=kv_lens.tolist(),
        cascade=levels,
        num_cascade_reqs=cascade.num_cascade_reqs if cascade else 0,
    )


def _cascade_levels(tables: PageRows, kv_lens: np.ndarray, page_size: int,
                    plan: CascadePlan, device: torch.device) -> list[CascadeLevel]:
    """Two levels over the first `plan.num_cascade_reqs` requests (one query token each):
    level 0 = each group's shared full pages, level 1 = each request's own pages."""
    sizes = np.array([len(g.members) for g in plan.groups], dtype=np.int64)  # [G]
    shared = np.array([g.num_shared_pages for g in plan.groups], dtype=np.int64)  # [G]
    first = _indptr(sizes)[:-1]  # [G]: each group's first request in batch order
    n = int(sizes.sum())
    # Level 0: a group's shared pages are its first member's leading pages.
    shared_idx = _gather(tables.table, tables.rows[first], np.zeros_like(shared), shared)
    # Level 1: each member's pages past its group's shared ones.
    skip = np.repeat(shared, sizes)  # [n]
    own_len = kv_lens[:n] - skip * page_size  # [n]
    own_pages = -(-own_len // page_size)  # [n]
    own_idx = _gather(tables.table, tables.rows[:n], skip, own_pages)
    return [_level(_indptr(sizes), _indptr(shared), shared_idx,
                   np.full(len(sizes), page_size), device),
            _level(np.arange(n + 1), _indptr(own_pages), own_idx,
                   _last_len(own_len, page_size), device)]


def _level(qo_indptr: np.ndarray, kv_indptr: np.ndarray, kv_indices: np.ndarray,
           last_page_len: np.ndarray, device: torch.device) -> CascadeLevel:
    return CascadeLevel(_dev(qo_indptr, np.int32, device), _dev(kv_indptr, np.int32, device),
                        _dev(kv_indices, np.int32, device), _dev(last_page_len, np.int32, device),
                        qo_indptr.tolist(), kv_indptr.tolist(), last_page_len.tolist())

"""Builds the per-step AttentionMetadata from plain page lists (once per step, not per layer)."""

from __future__ import annotations

import torch

from engine.attention.base import AttentionMetadata, CascadeLevel
from engine.attention.cascade import CascadePlan


def _last_len(kv_len: int, page_size: int) -> int:
    return (kv_len - 1) % page_size + 1 if kv_len else 0


def _i32(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32).to(device, non_blocking=True)


def build_metadata(block_tables: list[list[int]], num_computed: list[int], num_new: list[int],
                   page_size: int, device: torch.device,
                   cascade: CascadePlan | None = None) -> AttentionMetadata:
    """Requests in batch order (already reordered for cascade when `cascade` is given)."""
    qo_indptr, kv_indptr, kv_indices, last_len, kv_lens = [0], [0], [], [], []
    positions, slots = [], []
    for table, done, n in zip(block_tables, num_computed, num_new):
        kv_len = done + n
        pages = table[:-(-kv_len // page_size)]
        qo_indptr.append(qo_indptr[-1] + n)
        kv_indices += pages
        kv_indptr.append(len(kv_indices))
        last_len.append(_last_len(kv_len, page_size))
        kv_lens.append(kv_len)
        for pos in range(done, kv_len):
            positions.append(pos)
            slots.append(table[pos // page_size] * page_size + pos % page_size)
    levels = None
    if cascade is not None:
        levels = _cascade_levels(block_tables, kv_lens, page_size, cascade, device)
    return AttentionMetadata(
        qo_indptr=_i32(qo_indptr, device),
        kv_indptr=_i32(kv_indptr, device),
        kv_indices=_i32(kv_indices, device),
        kv_last_page_len=_i32(last_len, device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64).to(device, non_blocking=True),
        positions=torch.tensor(positions, dtype=torch.int64).to(device, non_blocking=True),
        page_size=page_size,
        num_decode_only=all(n == 1 for n in num_new),
        qo_indptr_host=qo_indptr,
        kv_lens_host=kv_lens,
        cascade=levels,
        num_cascade_reqs=cascade.num_cascade_reqs if cascade else 0,
    )


def _cascade_levels(block_tables: list[list[int]], kv_lens: list[int], page_size: int,
                    plan: CascadePlan, device: torch.device) -> list[CascadeLevel]:
    """Two levels over the first `plan.num_cascade_reqs` requests (one query token each):
    level 0 = each group's shared full pages, level 1 = each request's own pages."""
    shared_qo, shared_kv, shared_idx, shared_last = [0], [0], [], []
    own_qo, own_kv, own_idx, own_last = [0], [0], [], []
    b = 0
    for group in plan.groups:
        s = group.num_shared_pages
        shared_idx += block_tables[b][:s]
        shared_kv.append(len(shared_idx))
        shared_last.append(page_size)
        shared_qo.append(shared_qo[-1] + len(group.members))
        for _ in group.members:
            own_len = kv_lens[b] - s * page_size
            own_idx += block_tables[b][s:s + -(-own_len // page_size)]
            own_kv.append(len(own_idx))
            own_last.append(_last_len(own_len, page_size))
            own_qo.append(own_qo[-1] + 1)
            b += 1
    return [CascadeLevel(_i32(shared_qo, device), _i32(shared_kv, device),
                         _i32(shared_idx, device), _i32(shared_last, device)),
            CascadeLevel(_i32(own_qo, device), _i32(own_kv, device),
                         _i32(own_idx, device), _i32(own_last, device))]

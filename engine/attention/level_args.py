"""LevelArgs: one FlashInfer paged wrapper's plan arguments for a graph step (one attention level
of a cascade, or a plain decode step)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LevelArgs:
    """Named as FlashInfer names them: host lists for the small arrays (the planner reads them on
    the host), the page ids on the device."""

    qo_indptr: list[int]  # [entries+1]
    kv_indptr: list[int]  # [entries+1]
    kv_indices: torch.Tensor  # [nnz_pages] int32, on the device
    kv_last_page_len: list[int]  # [entries]

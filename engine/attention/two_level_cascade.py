"""TwoLevelCascade: a cascade group's attention as two levels merged by their LSE: the group's
queries over its shared prefix pages, then each request over its own pages.

It is FlashInfer's `MultiLevelCascadeAttentionWrapper` rebuilt from the same public parts (one
`BatchPrefillWithPagedKVCacheWrapper` per level + `merge_state_in_place`) so that the levels'
kernel can be chosen: that wrapper always takes `auto`, which is FA3 on Hopper, and FA3 runs
the shared level (one long KV run, all the group's queries) slower than FA2, whose planner
splits the KV over the SMs (docs/benchmarks.md). A large group's shared level can still run on
FA3 with the prefix cut into slices (split_shared_level.py).
"""

from __future__ import annotations

import torch

from engine.attention.base import AttentionMetadata
from engine.attention.split_shared_level import SplitSharedLevel, split_pays


def _host_i32(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)


class TwoLevelCascade:
    """Shared-prefix attention merged with per-request attention, for one run of queries.

    `plan` takes per level (shared first) host lists qo_indptr, kv_indptr, kv_last_page_len and
    device kv_indices; only the last level is causal. `run(q, kv_cache)` -> [n, Hq, D]. With
    `split` (Hopper), a shared level that `split_pays` for runs on it instead
    (split_shared_level.py); such a step has no CUDA graph (`splits`).
    """

    def __init__(self, flashinfer, workspace: torch.Tensor, backend: str,
                 split: SplitSharedLevel | None = None) -> None:
        self._merge = flashinfer.merge_state_in_place
        self.levels = [flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD",
                                                                      backend=backend)
                       for _ in range(2)]
        self.split = split
        self._split_planned = False

    def splits(self, meta: AttentionMetadata) -> bool:
        """Whether this step's shared level runs split."""
        if self.split is None or meta.cascade is None:
            return False
        shared = meta.cascade[0]
        return split_pays(shared.qo_indptr_host, shared.kv_indptr_host, meta.page_size)

    def plan(self, qo_indptr: list[list[int]], kv_indptr: list[list[int]],
             kv_indices: list[torch.Tensor], last_page_len: list[list[int]], *heads,
             **kwargs) -> None:
        page_size = heads[3]
        self._split_planned = self.split is not None and split_pays(qo_indptr[0], kv_indptr[0],
                                                                    page_size)
        for i, wrapper in enumerate(self.levels):
            if i == 0 and self._split_planned:
                self.split.plan(qo_indptr[0], kv_indptr[0], kv_indices[0], last_page_len[0],
                                *heads, **kwargs)
                continue
            wrapper.plan(_host_i32(qo_indptr[i]), _host_i32(kv_indptr[i]), kv_indices[i],
                         _host_i32(last_page_len[i]), *heads,
                         causal=i == len(self.levels) - 1, **kwargs)

    def run(self, q: torch.Tensor, kv_cache: torch.Tensor) -> torch.Tensor:
        out, lse = self.levels[-1].run(q, kv_cache, return_lse=True)
        for i, wrapper in enumerate(self.levels[:-1]):
            if i == 0 and self._split_planned:
                out_i, lse_i = self.split.run(q, kv_cache)
            else:
                out_i, lse_i = wrapper.run(q, kv_cache, return_lse=True)
            self._merge(out, lse, out_i, lse_i)
        return out

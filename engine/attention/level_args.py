"""LevelArgs: one FlashInfer paged wrapper's plan arguments for a graph step (one attention level
of a cascade, or a plain decode step); `graph_wrapper`: a paged prefill wrapper in CUDA-graph
mode over fixed buffers, which such arguments refill before each replay."""

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

    def plan(self, wrapper, *heads, **kwargs) -> None:
        """Plan a paged prefill wrapper with these arguments; `heads` (num_qo_heads,
        num_kv_heads, head_dim, page_size) and `kwargs` as its `plan` takes them."""
        wrapper.plan(host_i32(self.qo_indptr), host_i32(self.kv_indptr), self.kv_indices,
                     host_i32(self.kv_last_page_len), *heads, **kwargs)


def host_i32(values: list[int]) -> torch.Tensor:
    """A host int32 tensor: how FlashInfer's planners take their small arrays."""
    return torch.tensor(values, dtype=torch.int32)


def graph_wrapper(fi, workspace: torch.Tensor, entries: int, kv_indices: torch.Tensor,
                  backend: str, device: torch.device):
    """`BatchPrefillWithPagedKVCacheWrapper` in graph mode for `entries` requests, over index
    buffers of its own and the given `kv_indices` buffer (shared with other wrappers)."""
    return fi.BatchPrefillWithPagedKVCacheWrapper(
        workspace, "NHD", use_cuda_graph=True,
        qo_indptr_buf=torch.zeros(entries + 1, dtype=torch.int32, device=device),
        paged_kv_indptr_buf=torch.zeros(entries + 1, dtype=torch.int32, device=device),
        paged_kv_indices_buf=kv_indices,
        paged_kv_last_page_len_buf=torch.ones(entries, dtype=torch.int32, device=device),
        backend=backend)

"""SplitSharedLevel: a large cascade group's shared level on FlashInfer's FA3 (Hopper) prefill
kernel, with the shared prefix cut into slices that run side by side.

The shared level is one long, unmasked attention: a group's G decode queries over its S shared
tokens, compute-bound (4·G·Hq·S·D flops a layer). FA2's planner splits that KV over the SMs and
reaches ~320 TFLOP/s; FA3's planner does not split a request's KV, so the level keeps
(G·Hq/Hkv / 128 query tiles) x Hkv CTAs busy, 32 of the H200's 132 at G = 128, and ran at half
FA2's speed (`MultiLevelCascadeAttentionWrapper` takes FA3 on Hopper, hence the engine's own
two FA2 levels). Here the prefix is cut into `splits` page-aligned slices, each posed to FA3 as a
request of the same G queries (the queries repeated), and the slices' outputs are merged by
their LSE. H200, 32 layers, Llama-3-8B heads (`python -m bench.gpu_cascade_shared`, run 86 of
docs/benchmarks.md): at 128 queries x 32K tokens FA2 6.90 ms, FA3 14.16 ms, FA3 over 4 slices
**5.31 ms** (414 TFLOP/s); 8 and 16 slices were slower (9.99, 11.05 ms). At 128 x 8K, 64 x 16K
and 32 x 32K FA2 stayed faster, so `split_pays` holds only where it was measured to pay.

Contract: `plan` takes one group's shared-level arguments (host lists, as FlashInfer names them;
`kv_indices` on the device) and `run(q, kv_cache)` returns that level's (out [G, Hq, D],
lse [G, Hq]), as the FA2 level's `run(..., return_lse=True)` does, for the same queries.
"""

from __future__ import annotations

import torch

SPLITS = 4  # slices of the prefix: 4 x 32 CTAs fill the H200's 132 SMs at G = 128
MIN_QUERIES = 128  # a group smaller than this keeps FA2 (32 x 32K: FA2 2.13 vs 4.32 ms)
MIN_SHARED_TOKENS = 32768  # and a shorter prefix too (128 x 8K: FA2 2.31 vs 2.83 ms)


def split_pays(qo_indptr: list[int], kv_indptr: list[int], page_size: int) -> bool:
    """Whether a shared level (its host qo_indptr / kv_indptr over groups) runs split: one group
    of >= MIN_QUERIES queries over >= MIN_SHARED_TOKENS tokens."""
    return (len(qo_indptr) == 2 and qo_indptr[1] >= MIN_QUERIES
            and kv_indptr[1] * page_size >= MIN_SHARED_TOKENS)


def _i32(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)


class SplitSharedLevel:
    def __init__(self, flashinfer, workspace: torch.Tensor, splits: int = SPLITS,
                 backend: str = "fa3") -> None:
        self.wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD",
                                                                      backend=backend)
        self._merge = flashinfer.merge_state_in_place
        self.splits = splits
        self.queries = 0  # G of the planned group

    def plan(self, qo_indptr: list[int], kv_indptr: list[int], kv_indices: torch.Tensor,
             kv_last_page_len: list[int], num_qo_heads: int, num_kv_heads: int, head_dim: int,
             page_size: int, **kwargs) -> None:
        """One group: qo_indptr [0, G], kv_indptr [0, P] (P >= splits pages)."""
        assert len(qo_indptr) == 2 and len(kv_indptr) == 2, "one group per split level"
        g, pages, s = qo_indptr[1], kv_indptr[1], self.splits
        assert pages >= s, f"{pages} shared pages cannot make {s} slices"
        bounds = [pages * i // s for i in range(s + 1)]  # page-aligned: slices 0..s-2 end full
        last = [page_size] * (s - 1) + [kv_last_page_len[0]]
        self.wrapper.plan(_i32([g * i for i in range(s + 1)]), _i32(bounds), kv_indices,
                          _i32(last), num_qo_heads, num_kv_heads, head_dim, page_size,
                          causal=False, **kwargs)
        self.queries = g

    def run(self, q: torch.Tensor, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g, s = self.queries, self.splits
        assert q.shape[0] == g, f"planned for {g} queries, given {q.shape[0]}"
        out, lse = self.wrapper.run(q.repeat(s, 1, 1), kv_cache, return_lse=True)  # [s·g, ...]
        for i in range(1, s):  # each slice into slice 0, in place (slices are contiguous rows)
            self._merge(out[:g], lse[:g], out[i * g:(i + 1) * g], lse[i * g:(i + 1) * g])
        return out[:g], lse[:g]

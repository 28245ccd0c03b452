"""The plans a FlashInferBackend step returns, and the parts they run (FlashInfer's objects are
handed in: this module never imports it):
- `KVWrite`: where a step's new K/V go, and FlashInfer's append kernel that stores them;
- `TwoLevelCascade`: a shared-prefix level and a per-request level, merged by LSE;
- `WrapperPlan`: every row through one planned wrapper (prefill, decode, a graph's decode, XQA);
- `CascadeDecodePlan`: the first requests through the cascade, the rest through decode.
flashinfer_graphs.py has the CUDA graphs' cascade plan (`GraphCascadePlan`).
"""

from __future__ import annotations

import torch

from engine.attention.base import FP8_KV, AttentionMetadata, AttentionPlan, to_kv_dtype
from engine.fp8_linear import compiled_on_cuda


class TwoLevelCascade:
    """Shared-prefix attention merged with per-request attention, for one run of queries.

    `plan` takes per level (shared first) qo_indptr, kv_indptr, kv_indices, kv_last_page_len;
    only the last level is causal. `run(q, kv_cache)` -> [n, Hq, D].
    """

    def __init__(self, flashinfer, workspace: torch.Tensor, backend: str) -> None:
        self._merge = flashinfer.merge_state_in_place
        self.levels = [flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD",
                                                                      backend=backend)
                       for _ in range(2)]

    def plan(self, qo_indptr, kv_indptr, kv_indices, last_page_len, *heads, **kwargs) -> None:
        for i, wrapper in enumerate(self.levels):
            wrapper.plan(qo_indptr[i], kv_indptr[i], kv_indices[i], last_page_len[i], *heads,
                         causal=i == len(self.levels) - 1, **kwargs)

    def run(self, q: torch.Tensor, kv_cache: torch.Tensor) -> torch.Tensor:
        out, lse = self.levels[-1].run(q, kv_cache, return_lse=True)
        for wrapper in self.levels[:-1]:
            out_i, lse_i = wrapper.run(q, kv_cache, return_lse=True)
            self._merge(out, lse, out_i, lse_i)
        return out


class KVWrite:
    """Where a step's new K/V go, and the kernel that stores them.

    `page`, `offset`, `last` [T] int32 per token row: pool page, in-page offset, offset + 1.
    FlashInfer's `append_paged_kv_cache` stores them, each row posing as a request of one page
    (kv_indptr = `rows` [0..T], kv_indices = `page`, position = `offset`, last page length =
    `last`): one kernel for K and V that took 1.9-2.3 us per layer at 1-128 rows, against 3.3-3.9
    us for the indexed store (H200, run 74, `python -m bench.gpu_kv_write`). The append kernel
    stores only K/V of the pool's dtype, so for fp8 pools one compiled kernel first saturates
    and casts K and V together (`to_fp8_rows`), where the indexed store took three launches
    (clamp, cast, scatter). Every tensor may be a view of a fixed buffer, so a CUDA graph
    replays the store.
    """

    def __init__(self, page: torch.Tensor, offset: torch.Tensor, last: torch.Tensor,
                 rows: torch.Tensor, append) -> None:
        self.page = page
        self.offset = offset
        self.last = last
        self.rows = rows  # [>= T + 1] int32: 0, 1, 2, ...
        self.append = append  # flashinfer.append_paged_kv_cache

    @classmethod
    def from_slots(cls, slot_mapping: torch.Tensor, page_size: int, rows: torch.Tensor,
                   append) -> KVWrite:
        page = torch.div(slot_mapping, page_size, rounding_mode="floor")
        offset = (slot_mapping - page * page_size).int()
        return cls(page.int(), offset, offset + 1, rows, append)

    def __call__(self, kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        t = k.shape[0]
        if kv_cache.dtype != k.dtype:
            assert kv_cache.dtype == FP8_KV, f"K/V of {k.dtype} into a {kv_cache.dtype} pool"
            kv = to_fp8_rows(_side_by_side(k, v)).view(t, 2, *k.shape[1:])  # [T, 2, Hkv, D]
            k, v = kv[:, 0], kv[:, 1]
        self.append(k, v, self.rows[:t], self.offset, kv_cache, self.page, self.rows[:t + 1],
                    self.last)


def _side_by_side(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[T, 2·Hkv·D]: each row k's then v's. A view where they lie side by side in the fused
    qkv output (rows of k, then v, with v right after k), else a copy."""
    t, width = k.shape[0], k[0].numel()
    if (k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
            and k.stride() == v.stride() and v.data_ptr() - k.data_ptr() == width * k.element_size()
            and k.stride(-1) == 1 and k.stride(-2) == k.shape[-1]):
        return k.as_strided((t, 2 * width), (k.stride(0), 1))
    return torch.cat([k.reshape(t, width), v.reshape(t, width)], dim=1)


def _to_fp8(x: torch.Tensor) -> torch.Tensor:
    return to_kv_dtype(x, FP8_KV)


to_fp8_rows = compiled_on_cuda(_to_fp8)  # one kernel on CUDA: clamp and cast fused


class WrapperPlan(AttentionPlan):
    """A step whose rows all run through one planned wrapper: the prefill wrapper (any batch
    with a prefill chunk), the decode wrapper (decode-only) or a CUDA graph's decode wrapper."""

    def __init__(self, meta: AttentionMetadata, write: KVWrite, wrapper) -> None:
        super().__init__(meta)
        self.write = write
        self.wrapper = wrapper

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor) -> torch.Tensor:
        self.write(kv_cache, k, v)
        return self.wrapper.run(q, kv_cache)


class CascadeDecodePlan(AttentionPlan):
    """A decode-only step whose first `num_cascade` requests run the two-level cascade and the
    rest (if any) the decode wrapper; outputs are concatenated in batch order."""

    def __init__(self, meta: AttentionMetadata, write: KVWrite, cascade: TwoLevelCascade,
                 num_cascade: int, rest) -> None:
        super().__init__(meta)
        self.write = write
        self.cascade = cascade
        self.num_cascade = num_cascade
        self.rest = rest  # the decode wrapper, planned for requests num_cascade.., or None

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor) -> torch.Tensor:
        self.write(kv_cache, k, v)
        nc = self.num_cascade
        out = self.cascade.run(q[:nc], kv_cache)
        if self.rest is None:
            return out
        return torch.cat([out, self.rest.run(q[nc:], kv_cache)])

"""The FlashInfer backend's CUDA-graph state: fixed buffers and the wrappers that captured decode
steps read, for plain and for cascade decode steps.

A graph of bucket b runs b rows: the step's n requests first, then b - n padding rows. Padding
rows attend over the pool's scratch page and write their K/V into it (`KVPool.scratch_page`),
so they touch no page that a request reads and cost no extra kernel (they once copied row 0's
K/V through a gather in every layer).

- Plain decode (`meta.cascade` None): one `BatchDecodeWithPagedKVCacheWrapper` per bucket.
- Cascade decode: per bucket, two `BatchPrefillWithPagedKVCacheWrapper`s in CUDA-graph mode
  and one masked `merge_state_in_place`:
  * own level, all b rows (one query each, causal): a cascade member's pages past its group's
    shared ones, a request outside any group all of its pages, a padding row the scratch page;
  * shared level, `groups` entries (FlashInfer's graph mode fixes a wrapper's batch size): the
    queries of each group over its shared pages; unused entries have no queries and no pages,
    so they launch no work;
  * the merge adds the shared part to the rows of groups only (`merge_mask`).
  A step with more groups than its bucket's `groups` runs eagerly.
- Split cascade decode (`graph_kind` "cascade_split"), buckets of >= 128 rows on Hopper: the
  same, with the shared level of one large group on FA3 over slices of the prefix
  (split_shared_level.py), the faster kernel there.

FlashInfer's graph-mode planner (scheduler.cuh, `PrefillSplitQOKVIndptr`) fixes the query tile
from the row count of the first plan, the capture's, as (rows - entries + 1) queries per entry,
and always splits the KV (so the captured merge kernel always has work that fits). Capturing
with all b rows in one group makes that the largest step the bucket will see; a small `groups`
keeps the tile large (128 rows for b >= 32 at GQA 4), as the eager planner picks for one big
group: the shared prefix is then read once per 32 queries, not once per 4.
"""

from __future__ import annotations

import torch

from engine.attention import split_shared_level as split_level
from engine.attention.base import AttentionMetadata, AttentionPlan
from engine.attention.level_args import LevelArgs, graph_wrapper
from engine.attention.split_shared_level import SplitSharedLevel, split_pays

# Most groups a cascade graph takes (per bucket: min(this, b // 2); a group has >= 2 members).
CASCADE_GRAPH_GROUPS = 4


def cascade_graph_groups(batch_size: int) -> int:
    """Shared-level entries of bucket `batch_size`'s cascade graph; 0: the bucket has none."""
    return min(CASCADE_GRAPH_GROUPS, batch_size // 2)


def paging(kv_lens: list[int], page_size: int) -> tuple[list[int], list[int]]:
    """Host kv_indptr [B+1] and kv_last_page_len [B] from the KV lengths (no device read)."""
    indptr, last = [0], []
    for n in kv_lens:
        indptr.append(indptr[-1] + -(-n // page_size))
        last.append((n - 1) % page_size + 1)
    return indptr, last


def own_level_args(meta: AttentionMetadata, batch_size: int, scratch: torch.Tensor) -> LevelArgs:
    """Every row of the bucket, one query each: cascade members' own pages (`meta.cascade[-1]`),
    then the other requests' pages, then `batch_size - n` padding rows on the scratch page.

    Without a cascade this is the plain decode graph's plan. `scratch` is [>= pad] int32, every
    entry the scratch page.
    """
    n, ps = meta.batch_size, meta.page_size
    nc = meta.num_cascade_reqs if meta.cascade else 0
    pad = batch_size - n
    indptr, last = paging(meta.kv_lens_host, ps)
    if nc:
        own = meta.cascade[-1]
        kv_indptr, last_len = list(own.kv_indptr_host), list(own.kv_last_page_len_host)
        runs = [own.kv_indices]
    else:
        kv_indptr, last_len, runs = [0], [], []
    shift = kv_indptr[-1] - indptr[nc]
    kv_indptr += [p + shift for p in indptr[nc + 1:]]
    last_len += last[nc:]
    runs.append(meta.kv_indices[indptr[nc]:])
    kv_indptr += [kv_indptr[-1] + i for i in range(1, pad + 1)]
    last_len += [1] * pad
    runs.append(scratch[:pad])
    return LevelArgs(list(range(batch_size + 1)), kv_indptr, torch.cat(runs), last_len)


def shared_level_args(meta: AttentionMetadata, groups: int) -> LevelArgs:
    """The step's groups (`meta.cascade[0]`) padded to `groups` entries of no queries and no
    pages (their last-page length is never read; a full page keeps it in range)."""
    shared = meta.cascade[0]
    extra = groups - len(shared.kv_last_page_len_host)
    if extra < 0:
        raise ValueError(f"{groups - extra} groups do not fit a graph of {groups}")
    return LevelArgs(shared.qo_indptr_host + [shared.qo_indptr_host[-1]] * extra,
                     shared.kv_indptr_host + [shared.kv_indptr_host[-1]] * extra,
                     shared.kv_indices,
                     shared.kv_last_page_len_host + [meta.page_size] * extra)


def merge_mask(meta: AttentionMetadata, batch_size: int) -> list[bool]:
    """[batch_size]: which rows take the shared level's part (the cascade members)."""
    nc = meta.num_cascade_reqs if meta.cascade else 0
    return [True] * nc + [False] * (batch_size - nc)


class CascadeGraph:
    """The two level wrappers of one bucket's cascade graph, over fixed index buffers."""

    def __init__(self, fi, workspace: torch.Tensor, batch_size: int, groups: int,
                 shared_indices: torch.Tensor, own_indices: torch.Tensor, backend: str,
                 device: torch.device) -> None:
        self.batch_size, self.groups = batch_size, groups
        self.shared = graph_wrapper(fi, workspace, groups, shared_indices, backend, device)
        self.own = graph_wrapper(fi, workspace, batch_size, own_indices, backend, device)
        self._merge = fi.merge_state_in_place


class GraphCascadePlan(AttentionPlan):
    """A cascade decode step inside a captured graph: K/V write, own level (every row), shared
    level (the groups' rows), masked merge. The same kernels per layer whatever the groups and
    the rows outside them: each level's attention and split-KV merge (graph mode always splits
    the KV), then `merge_state_in_place`. With `split`, the shared level is that one group's
    FA3 over slices (split_shared_level.py) instead of the graph's FA2 shared wrapper."""

    def __init__(self, meta: AttentionMetadata, write, graph: CascadeGraph,
                 mask: torch.Tensor, split: SplitSharedLevel | None = None) -> None:
        super().__init__(meta)
        self.write = write  # KVWrite over the graph's fixed page/offset rows
        self.graph = graph
        self.mask = mask  # [b] uint8, a view of GraphBuffers.merge_mask
        self.split = split

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor) -> torch.Tensor:
        self.write(kv_cache, k, v)
        g = self.graph
        out, lse = g.own.run(q, kv_cache, return_lse=True)  # [b, Hq, D], [b, Hq]
        # rows outside the groups hold no shared part; the mask keeps the merge off them
        if self.split is None:
            shared_out, shared_lse = g.shared.run(q, kv_cache, return_lse=True)
        else:
            shared_out, shared_lse = self.split.run(q, kv_cache)
        g._merge(out, lse, shared_out, shared_lse, self.mask)
        return out


class GraphBuffers:
    """What captured decode graphs read, at fixed addresses (refilled before each replay): the
    decode wrappers and cascade graphs per bucket, their index buffers, the K/V write rows."""

    def __init__(self, fi, workspace: torch.Tensor, batch_sizes: list[int],
                 max_num_indices: int, scratch_page: int, device: torch.device,
                 cascade_backend: str = "fa2", split_graphs: bool = False) -> None:
        b_max = max(batch_sizes)
        self.scratch_page = scratch_page
        # [b_max] int32, every entry the scratch page: the padding rows' page runs
        self.scratch = torch.full((b_max,), scratch_page, dtype=torch.int32, device=device)
        # plain decode and the cascade's own level (never in the same step): every page of
        # the step, plus one per padding row
        self.indices = torch.zeros(max_num_indices + b_max, dtype=torch.int32, device=device)
        self.shared_indices = torch.zeros(max_num_indices, dtype=torch.int32, device=device)
        # the K/V store's rows (flashinfer_plans.KVWrite): page, offset, offset + 1, 0..b_max;
        # `rows` is the graphs' own, as the backend's (`FlashInferBackend.rows`) is replaced
        # when it grows and captured kernels must keep reading one address
        self.page = torch.zeros(b_max, dtype=torch.int32, device=device)
        self.offset = torch.zeros(b_max, dtype=torch.int32, device=device)
        self.last = torch.ones(b_max, dtype=torch.int32, device=device)
        self.rows = torch.arange(b_max + 1, dtype=torch.int32, device=device)
        self.merge_mask = torch.zeros(b_max, dtype=torch.uint8, device=device)
        self.wrappers = {b: fi.BatchDecodeWithPagedKVCacheWrapper(
            workspace, "NHD", use_cuda_graph=True, use_tensor_cores=True,
            paged_kv_indptr_buffer=torch.zeros(b + 1, dtype=torch.int32, device=device),
            paged_kv_indices_buffer=self.indices,
            paged_kv_last_page_len_buffer=torch.ones(b, dtype=torch.int32, device=device),
            backend="fa2") for b in batch_sizes}
        self.xqa = None  # XQADecode over fp8 pages: plain decode's kernel (set by the backend)
        self.cascades = {b: CascadeGraph(fi, workspace, b, cascade_graph_groups(b),
                                         self.shared_indices, self.indices, cascade_backend,
                                         device)
                         for b in batch_sizes if cascade_graph_groups(b)}
        # split cascade graphs (FA3 over slices of one large group's prefix), where the backend
        # allows them; `split_on` False makes steps take the FA2 cascade graph (comparisons)
        self.splits = {b: SplitSharedLevel(fi, workspace, b, self.shared_indices, device)
                       for b in self.cascades if split_graphs and b >= split_level.MIN_QUERIES}
        self.split_on = True

    def fill_write_rows(self, meta: AttentionMetadata, batch_size: int,
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Page, in-page offset and offset + 1 [batch_size] int32 of each row's new K/V (views
        of the fixed buffers): the requests' slots, then the scratch page's slot 0 for
        padding."""
        n, ps = meta.batch_size, meta.page_size
        page, offset = self.page[:batch_size], self.offset[:batch_size]
        # int64 slots into the int32 buffers: the kernels write the narrower type directly
        torch.div(meta.slot_mapping, ps, rounding_mode="floor", out=page[:n])
        torch.remainder(meta.slot_mapping, ps, out=offset[:n])
        page[n:].fill_(self.scratch_page)
        offset[n:].fill_(0)
        last = self.last[:batch_size]
        torch.add(offset, 1, out=last)
        return page, offset, last

    def graph_kind(self, meta: AttentionMetadata, batch_size: int) -> str:
        """Which of bucket `batch_size`'s graphs a decode step replays: "decode", "cascade", or
        "cascade_split" (one large group, where this bucket has a split graph)."""
        if meta.cascade is None:
            return "decode"
        if self.split_on and batch_size in self.splits and split_pays(meta):
            return "cascade_split"
        return "cascade"

    def cascade_kinds(self, batch_size: int) -> tuple[str, ...]:
        """The cascade graphs to capture at `batch_size`."""
        if batch_size not in self.cascades:
            return ()
        return ("cascade", "cascade_split") if batch_size in self.splits else ("cascade",)

    def uses_xqa(self, meta: AttentionMetadata) -> bool:
        """Whether this step's graph runs XQA (else FA2's wrappers): plain decode over fp8."""
        return meta.cascade is None and self.xqa is not None

    @property
    def max_indices(self) -> int:
        """The most `kv_indices` a graph step may hold (the rest of `indices` is padding's)."""
        return self.indices.numel() - self.page.numel()

    def fits(self, meta: AttentionMetadata, batch_size: int) -> bool:
        """Whether a decode-only step can replay bucket `batch_size`'s graph of its kind."""
        if meta.kv_indices.numel() > self.max_indices:
            return False
        if meta.cascade is None:
            return batch_size in self.wrappers
        graph = self.cascades.get(batch_size)
        # Each level's pages are a subset of the step's, so the index buffers hold them.
        return (graph is not None and len(meta.cascade) == 2
                and len(meta.cascade[0].kv_last_page_len_host) <= graph.groups)

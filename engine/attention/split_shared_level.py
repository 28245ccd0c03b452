"""SplitSharedLevel: one large cascade group's shared level inside a cascade CUDA graph, on
FlashInfer's FA3 (Hopper) prefill kernel, with the shared prefix cut into slices.

The shared level is one long, unmasked attention: a group's G decode queries over its S shared
tokens, compute-bound (4·G·Hq·S·D flops a layer). FA2's planner splits that KV over the SMs and
reaches ~320 TFLOP/s. FA3's planner neither splits a request's KV nor packs a KV head's query
heads into one tile, so G = 128 queries make one 128-row tile per query head: 32 works for the
H200's 132 SMs, at half FA2's speed. Posing the prefix as `splits` requests of the same queries
(the queries repeated), each over a page-aligned slice, gives 4 x 32 works, and the slices'
outputs merge by their LSE. Alone, at 128 queries x 32K tokens, 32 layers (H200, run 87 of
docs/benchmarks.md, `python -m bench.gpu_cascade_shared`): FA2 6.90 ms, FA3 14.16 ms, FA3 over
4 slices 5.31 ms; 8 and 16 slices were slower. Run eagerly in the engine (commit 3b7f7b9,
reverted) it lost: the repeat, three merges and FA3's wrapper call per layer cost more host
time than the kernel saved. Inside a graph those launches are replayed, not issued: at 128
requests x 32K shared x 256 own tokens the level took 3.93 ms a step against FA2's 6.35, and
the step 12.37 ms against 14.71 (run 95). With the thresholds lowered for a run (`python -m
bench.gpu_cascade engine --split-min 64:8192`, runs 99-100), whole steps with split graphs
against FA2 ones: 128 requests over 8K shared tokens 8.78 against 9.40 ms, over 16K 9.64
against 12.11; 64 requests lost at 8K, 16K and 32K (7.63 / 7.54, 8.56 / 8.33, 10.45 / 9.85),
as FA3's 128-row tiles then run half empty.

In bucket b's graph every slice is a request of all b rows' queries, so the slices' bounds are
the only thing that changes between replays. Rows outside the group compute a part that the
cascade's masked merge never reads; `split_pays` picks this graph only for a group of at least
MIN_QUERIES requests, which (the largest bucket being 128, engine/cuda_graph.py) is then the
whole bucket.

Contract: `plan(args)` writes the wrapper's fixed buffers from `split_level_args`; `run(q
[b, Hq, D], kv_cache)` -> (out [b, Hq, D], lse [b, Hq]), the shared level of the group's rows
(the first `G` rows; the others' values are unread), as the FA2 level's `run(...,
return_lse=True)` gives them.
"""

from __future__ import annotations

import torch

from engine.attention.base import AttentionMetadata
from engine.attention.level_args import LevelArgs, graph_wrapper

SPLITS = 4  # slices of the prefix: 4 x 32 works fill the H200's 132 SMs at G = 128
MIN_QUERIES = 128  # smaller groups keep FA2 (64 requests lost in a graph, runs 99-100)
MIN_SHARED_TOKENS = 8192  # shorter prefixes too (128 x 2K and 4K: not measured)


def split_pays(meta: AttentionMetadata) -> bool:
    """Whether a cascade step's shared level runs split: one group of >= MIN_QUERIES requests
    over >= MIN_SHARED_TOKENS shared tokens."""
    shared = meta.cascade[0]
    qo, kv = shared.qo_indptr_host, shared.kv_indptr_host
    return (len(qo) == 2 and qo[1] >= MIN_QUERIES
            and kv[1] * meta.page_size >= MIN_SHARED_TOKENS)


def split_level_args(meta: AttentionMetadata, batch_size: int, splits: int = SPLITS
                     ) -> LevelArgs:
    """The FA3 wrapper's arguments for one group: `splits` requests of all `batch_size` rows,
    request i over pages [P·i // splits, P·(i+1) // splits) of the group's P shared pages."""
    shared = meta.cascade[0]
    assert len(shared.kv_last_page_len_host) == 1, "a split shared level holds one group"
    pages = shared.kv_indptr_host[1]
    if pages < splits:
        raise ValueError(f"{pages} shared pages cannot make {splits} slices")
    bounds = [pages * i // splits for i in range(splits + 1)]  # slices 0..splits-2 end full
    return LevelArgs([batch_size * i for i in range(splits + 1)], bounds, shared.kv_indices,
                     [meta.page_size] * (splits - 1) + [shared.kv_last_page_len_host[0]])


class SplitSharedLevel:
    """The FA3 wrapper of one bucket's split graph, over fixed buffers (`kv_indices` is the
    graphs' shared-level index buffer)."""

    def __init__(self, fi, workspace: torch.Tensor, batch_size: int, kv_indices: torch.Tensor,
                 device: torch.device, splits: int = SPLITS, backend: str = "fa3") -> None:
        self.batch_size, self.splits = batch_size, splits
        self.wrapper = graph_wrapper(fi, workspace, splits, kv_indices, backend, device)
        self._merge = fi.merge_state_in_place

    def plan(self, args: LevelArgs, num_qo_heads: int, num_kv_heads: int, head_dim: int,
             page_size: int, **kwargs) -> None:
        args.plan(self.wrapper, num_qo_heads, num_kv_heads, head_dim, page_size, causal=False,
                  **kwargs)

    def run(self, q: torch.Tensor, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, s = self.batch_size, self.splits
        out, lse = self.wrapper.run(q.repeat(s, 1, 1), kv_cache, return_lse=True)  # [s·b, ...]
        for i in range(1, s):  # each slice into slice 0, in place (slices are contiguous rows)
            self._merge(out[:b], lse[:b], out[i * b:(i + 1) * b], lse[i * b:(i + 1) * b])
        return out[:b], lse[:b]

"""FlashInferBackend: paged attention on the GPU through FlashInfer's batch wrappers.

One wrapper per kind of step, each planned once per step and run once per layer:
- any batch holding a prefill chunk: `BatchPrefillWithPagedKVCacheWrapper` (causal) for all of
  its requests (decode rows are prefill rows of length one);
- decode-only batches: `BatchDecodeWithPagedKVCacheWrapper` with tensor cores (GQA groups ride
  the MMA rows);
- decode batches with a cascade plan: a 2-level cascade (shared prefix pages, then each
  request's own pages, merged by LSE) for the first `num_cascade_reqs` requests, plain decode
  for the rest. It is FlashInfer's `MultiLevelCascadeAttentionWrapper` rebuilt from the same
  public parts (one `BatchPrefillWithPagedKVCacheWrapper` per level + `merge_state_in_place`)
  so that the levels' kernel can be chosen: that wrapper always takes `auto`, which is FA3 on
  Hopper, and FA3 runs the shared level (one long KV run, all the group's queries) slower
  than FA2 (whose planner splits the KV over the SMs): for 128 requests sharing 32K tokens the
  cascade attention took 42 ms per step on FA3 and 30 ms on FA2, against 79 ms for plain
  decode (H200, docs/benchmarks.md);
- CUDA-graph replays (engine/cuda_graph.py), plain and cascade decode: per captured batch size
  a decode wrapper and a cascade graph over fixed index buffers (`GraphBuffers`,
  flashinfer_graphs.py) that `plan_cuda_graph` refills before each replay;
- plain decode over fp8 pages, eager and in graphs: the XQA kernel (xqa_decode.py), which
  reads fp8 pages about twice as fast as the FA2 decode kernel (`fp8_decode`, below).

`plan` returns the step's plan: `WrapperPlan` (one wrapper runs every row: prefill, decode, or a
graph's decode wrapper), `CascadeDecodePlan` (both in flashinfer_plans.py), or `GraphCascadePlan`
(a cascade graph's, flashinfer_graphs.py); each writes the new K/V through its `KVWrite`.
The wrappers belong to the backend and are re-planned every step, so a plan is valid until the
next `plan`/`plan_cuda_graph` call.

All wrappers share one float workspace (they run one after another on one stream). Planning
reads only host lists (`qo_indptr_host`, `kv_lens_host`, the cascade levels' host mirrors) and
device index tensors, so no step waits on the GPU.
FlashInfer is imported here, lazily: CPU installs never load this module.
"""

from __future__ import annotations

import importlib

import torch

from engine.attention.base import (
    FP8_KV,
    KV_FP8_SCALE,
    AttentionBackend,
    AttentionMetadata,
    AttentionPlan,
)
from engine.attention.flashinfer_graphs import (
    GraphBuffers,
    GraphCascadePlan,
    merge_mask,
    own_level_args,
    paging,
    shared_level_args,
)
from engine.attention.flashinfer_plans import (
    CascadeDecodePlan,
    KVWrite,
    TwoLevelCascade,
    WrapperPlan,
)
from engine.attention.level_args import host_i32
from engine.attention.split_shared_level import split_level_args
from engine.attention.xqa_decode import decode_kernels
from engine.host_copy import copy_from_host

WORKSPACE_BYTES = 128 * 1024 * 1024
HEAD_DIMS = (64, 128, 256)  # what both FlashInfer prefill kernels (FA2, FA3) instantiate


class FlashInferBackend(AttentionBackend):
    supports_cuda_graphs = True

    def __init__(self, num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str, page_size: int = 16, max_num_seqs: int = 64,
                 kv_dtype: torch.dtype | None = None, *, prefill_backend: str = "auto",
                 cascade_backend: str = "fa2", fp8_decode: str | None = None) -> None:
        """`fp8_decode`: plain decode's kernel over fp8 pages (xqa_decode.decode_kernels)."""
        super().__init__(num_q_heads, num_kv_heads, head_dim, dtype, device, page_size,
                         max_num_seqs, kv_dtype)
        # fp8 pages: bf16/fp16 queries over float8_e4m3fn K/V (kv_data_type in each plan). FA2
        # runs that mix; FA3's fp8 kernels want fp8 queries too, so "auto" (FA3 on Hopper)
        # becomes FA2 here. The pages' scale is KV_FP8_SCALE = 1.0, which is what `run` assumes
        # without its k_scale / v_scale arguments (a v_scale would cost one more launch per
        # layer), so no plan passes them.
        assert KV_FP8_SCALE == 1.0, "fp8 KV scales other than 1.0 need k_scale / v_scale"
        if self.kv_dtype == FP8_KV and prefill_backend == "auto":
            prefill_backend = "fa2"
        if self.device.type != "cuda":
            raise ValueError("the flashinfer attention backend needs a CUDA device")
        if head_dim not in HEAD_DIMS:
            raise ValueError(f"the flashinfer attention backend runs head_dim {HEAD_DIMS}, not "
                             f"{head_dim}; use attention_backend='torch' for this model")
        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"the flashinfer attention backend runs float16/bfloat16, not {dtype}")
        import flashinfer

        self._fi = flashinfer
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            self.workspace, "NHD", backend=prefill_backend)
        self.decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_tensor_cores=True, backend="fa2")
        self.cascade = TwoLevelCascade(flashinfer, self.workspace, cascade_backend)
        self.cascade_backend = cascade_backend  # also the kernel of cascade graphs' levels
        self.graph_buffers: GraphBuffers | None = None  # set by enable_cuda_graphs
        self._rows = torch.arange(1, dtype=torch.int32, device=self.device)  # see `rows`
        # plain decode over fp8 pages, unless None (FA2); the module by name, as `flashinfer.xqa`
        # is also the function FlashInfer re-exports
        self.xqa = decode_kernels(
            fp8_decode, importlib.import_module("flashinfer.xqa").get_xqa_module, dtype,
            self.kv_dtype, num_q_heads, num_kv_heads, head_dim, page_size, max_num_seqs,
            self.device)

    # -- planning ---------------------------------------------------------------------------
    def rows(self, n: int) -> torch.Tensor:
        """[>= n + 1] int32 0, 1, 2, ...: the K/V store's one-page requests (`KVWrite`), kept
        and grown by doubling, so a step makes none."""
        if self._rows.numel() <= n:
            self._rows = torch.arange(2 * (n + 1), dtype=torch.int32, device=self.device)
        return self._rows

    def _plan_args(self) -> dict:
        return dict(q_data_type=self.dtype, kv_data_type=self.kv_dtype, sm_scale=self.scale)

    def plan(self, meta: AttentionMetadata) -> AttentionPlan:
        write = KVWrite.from_slots(meta.slot_mapping, self.page_size,
                                   self.rows(meta.num_tokens), self._fi.append_paged_kv_cache)
        heads = (self.num_q_heads, self.num_kv_heads, self.head_dim, meta.page_size)
        indptr, last = paging(meta.kv_lens_host, self.page_size)
        if not meta.num_decode_only:
            self.prefill.plan(host_i32(meta.qo_indptr_host), host_i32(indptr), meta.kv_indices,
                              host_i32(last), *heads, causal=True, **self._plan_args())
            return WrapperPlan(meta, write, self.prefill)
        nc = meta.num_cascade_reqs if meta.cascade else 0
        if nc:
            self._plan_cascade(meta, heads)
        if not nc and self.xqa is not None:
            xqa = self.xqa.eager(meta)
            xqa.plan(meta, meta.batch_size)
            return WrapperPlan(meta, write, xqa)
        if nc < meta.batch_size:
            rest = [p - indptr[nc] for p in indptr[nc:]]
            self.decode.plan(host_i32(rest), meta.kv_indices[indptr[nc]:], host_i32(last[nc:]),
                             *heads, **self._plan_args())
        if not nc:
            return WrapperPlan(meta, write, self.decode)
        return CascadeDecodePlan(meta, write, self.cascade, nc,
                                 self.decode if nc < meta.batch_size else None)

    def _plan_cascade(self, meta: AttentionMetadata, heads: tuple) -> None:
        levels = meta.cascade
        # The levels' small arrays come from their host mirrors: no device-to-host copy.
        self.cascade.plan([host_i32(lv.qo_indptr_host) for lv in levels],
                          [host_i32(lv.kv_indptr_host) for lv in levels],
                          [lv.kv_indices for lv in levels],
                          [host_i32(lv.kv_last_page_len_host) for lv in levels], *heads,
                          **self._plan_args())

    # -- CUDA graphs ------------------------------------------------------------------------
    def enable_cuda_graphs(self, batch_sizes: list[int], max_num_indices: int,
                           scratch_page: int) -> None:
        """Make the decode wrappers and cascade graphs of each batch size over fixed index
        buffers (filled per step); padding rows use `scratch_page`."""
        self.graph_buffers = GraphBuffers(self._fi, self.workspace, batch_sizes,
                                          max_num_indices, scratch_page, self.device,
                                          self.cascade_backend, self._split_graphs())
        if self.xqa is not None:
            b_max = max(batch_sizes)
            self.graph_buffers.xqa = self.xqa.make(b_max, -(-max_num_indices // b_max),
                                                   scratch_page)

    def _split_graphs(self) -> bool:
        """Whether large groups' shared levels get split graphs (split_shared_level.py): FA3 is
        Hopper's, and its fp8 kernels want fp8 queries, so bf16/fp16 pages only; and where the
        levels are FA2's (another `cascade_backend` is the user's choice for every level)."""
        return (self.cascade_backend == "fa2" and self.kv_dtype != FP8_KV
                and self.device.type == "cuda"
                and torch.cuda.get_device_capability(self.device)[0] == 9)

    def graph_kind(self, meta: AttentionMetadata, batch_size: int) -> str:
        return self._graph_buffers().graph_kind(meta, batch_size)

    def cascade_graph_kinds(self, batch_size: int) -> tuple[str, ...]:
        return self._graph_buffers().cascade_kinds(batch_size)

    def _graph_buffers(self) -> GraphBuffers:
        if self.graph_buffers is None:
            raise RuntimeError("call enable_cuda_graphs before planning or sizing a CUDA graph")
        return self.graph_buffers

    def max_graph_indices(self) -> int:
        return self._graph_buffers().max_indices

    def can_graph(self, meta: AttentionMetadata, batch_size: int) -> bool:
        g = self._graph_buffers()
        return meta.num_decode_only and g.fits(meta, batch_size) and (
            not g.uses_xqa(meta) or g.xqa.fits(meta, batch_size))

    def plan_cuda_graph(self, meta: AttentionMetadata, batch_size: int,
                        kind: str | None = None) -> AttentionPlan:
        """Plan a decode-only step, plain or cascade, for the graph captured at `batch_size`
        (of `kind`; None: `graph_kind(meta, batch_size)`).

        Rows past the real ones are padding: they attend over the scratch page and write their
        K/V there (flashinfer_graphs.py), so padding changes no byte that a request reads.
        """
        g = self._graph_buffers()
        assert self.can_graph(meta, batch_size), "plan_cuda_graph of a step that does not fit"
        kind = kind or g.graph_kind(meta, batch_size)
        write = KVWrite(*g.fill_write_rows(meta, batch_size), g.rows,
                        self._fi.append_paged_kv_cache)
        if g.uses_xqa(meta):
            g.xqa.plan(meta, batch_size)
            return WrapperPlan(meta, write, g.xqa)
        heads = (self.num_q_heads, self.num_kv_heads, self.head_dim, meta.page_size)
        own = own_level_args(meta, batch_size, g.scratch)
        if meta.cascade is None:
            wrapper = g.wrappers[batch_size]
            wrapper.plan(host_i32(own.kv_indptr), own.kv_indices,
                         host_i32(own.kv_last_page_len), *heads, **self._plan_args())
            return WrapperPlan(meta, write, wrapper)
        graph, split = g.cascades[batch_size], None
        if kind == "cascade_split":
            split = g.splits[batch_size]
            split.plan(split_level_args(meta, batch_size, split.splits), *heads,
                       **self._plan_args())
        else:
            shared_level_args(meta, graph.groups).plan(graph.shared, *heads, causal=False,
                                                       **self._plan_args())
        own.plan(graph.own, *heads, causal=True, uniform_q_len=1, **self._plan_args())
        mask = g.merge_mask[:batch_size]
        copy_from_host(mask, torch.tensor(merge_mask(meta, batch_size), dtype=torch.uint8))
        return GraphCascadePlan(meta, write, graph, mask, split)

    # -- start-up ---------------------------------------------------------------------------
    def warmup(self) -> None:
        """Run each wrapper once on a toy batch so that FlashInfer's JIT builds happen now."""
        from engine.attention.cascade import CascadeGroup, CascadePlan
        from engine.attention.metadata import build_metadata

        ps, dev = self.page_size, self.device
        cache = torch.randn(8, 2, ps, self.num_kv_heads, self.head_dim,
                            device=dev).to(self.kv_dtype)

        def run(tables, done, new, cascade=None):
            meta = build_metadata(tables, done, new, ps, dev, cascade)
            plan = self.plan(meta)
            t = meta.num_tokens
            q = torch.randn(t, self.num_q_heads, self.head_dim, device=dev, dtype=self.dtype)
            kv = torch.randn(t, 2, self.num_kv_heads, self.head_dim, device=dev, dtype=self.dtype)
            plan.forward(0, q, kv[:, 0], kv[:, 1], cache)

        run([[0, 1]], [ps - 3], [5])  # prefill chunk over a cached prefix
        run([[2, 3], [4]], [ps + 2, 3], [1, 1])  # decode
        run([[0, 2], [0, 3], [5]], [ps + 1, ps + 4, 2], [1, 1, 1],
            CascadePlan(order=[0, 1, 2], groups=[CascadeGroup([0, 1], 1)]))
        torch.cuda.synchronize(dev)

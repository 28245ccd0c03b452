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
graph's decode wrapper), `CascadeDecodePlan`, or `GraphCascadePlan` (a cascade graph's); each
writes the new K/V through its `KVWrite`.
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
    to_kv_dtype,
)
from engine.attention.flashinfer_graphs import (
    GraphBuffers,
    GraphCascadePlan,
    merge_mask,
    own_level_args,
    paging,
    shared_level_args,
)
from engine.attention.level_args import host_i32
from engine.attention.split_shared_level import split_level_args
from engine.attention.xqa_decode import decode_kernels
from engine.fp8_linear import compiled_on_cuda
from engine.host_copy import copy_from_host

WORKSPACE_BYTES = 128 * 1024 * 1024
HEAD_DIMS = (64, 128, 256)  # what both FlashInfer prefill kernels (FA2, FA3) instantiate


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

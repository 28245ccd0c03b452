"""The attention-backend contract (a backend plans each step; the plan runs each layer) and the
per-step metadata every backend reads.

Field names follow FlashInfer's arguments so that a FlashInfer backend passes them straight on.
KV pool layout per layer: `[num_pages, 2, page_size, num_kv_heads, head_dim]` (NHD; index 0 = K,
1 = V). A request's KV is the concatenation of its pages `kv_indices[kv_indptr[b]:kv_indptr[b+1]]`,
the last one filled to `kv_last_page_len[b]`. The KV lengths include this step's new tokens: the
plan writes the new K/V first, then attends. Queries are the last `qo_len` tokens of their
request, so the causal mask is aligned to the bottom right:
query i sees kv j <= kv_len - qo_len + i.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from engine.fp8_linear import FP8 as FP8_KV
from engine.fp8_linear import FP8_MAX

# fp8 KV pages (engine.kv_cache_dtype fp8_e4m3) hold K and V as they are, scale 1.0: what vLLM
# and SGLang use without calibrated scales. e4m3's range (+-448) holds K and V of the Llama
# family; writes clamp to it (float8_e4m3fn has no inf) and reads upcast (docs/fp8.md).
# The dtype and its range are fp8 weights' own (engine/fp8_linear.py).
KV_FP8_SCALE = 1.0


@dataclass
class CascadeLevel:
    """One level of a cascade: attention of a run of queries over a run of pages.

    Entry g covers queries `qo_indptr[g]:qo_indptr[g+1]` and pages `kv_indices[kv_indptr[g]:...]`.
    In the shared-prefix level an entry is a group of requests (all their queries) and its shared
    full pages; in the last level an entry is one request and its own pages.
    """

    qo_indptr: torch.Tensor  # [G+1] int32
    kv_indptr: torch.Tensor  # [G+1] int32
    kv_indices: torch.Tensor  # [nnz_pages] int32
    kv_last_page_len: torch.Tensor  # [G] int32, in 1..page_size
    # Host mirrors of the three small arrays: planners read these, never the device copies
    # (a device-to-host copy would make the step wait for the GPU).
    qo_indptr_host: list[int]
    kv_indptr_host: list[int]
    kv_last_page_len_host: list[int]


@dataclass
class AttentionMetadata:
    qo_indptr: torch.Tensor  # [B+1] int32: request b's queries are q[qo_indptr[b]:qo_indptr[b+1]]
    kv_indptr: torch.Tensor  # [B+1] int32
    kv_indices: torch.Tensor  # [nnz_pages] int32
    kv_last_page_len: torch.Tensor  # [B] int32, in 1..page_size
    slot_mapping: torch.Tensor  # [T] int64: page * page_size + offset for each new token's K/V
    positions: torch.Tensor  # [T] int64
    page_size: int
    num_decode_only: bool  # True when every request has exactly one query token
    # Host mirrors, so that python-side planning never syncs with the device.
    qo_indptr_host: list[int]
    kv_lens_host: list[int]
    # Cascade (decode batches only): the first `num_cascade_reqs` requests are covered by
    # `cascade` levels (shared prefix first, own suffix last); the rest use plain decode.
    cascade: list[CascadeLevel] | None = None
    num_cascade_reqs: int = 0

    @property
    def batch_size(self) -> int:
        return len(self.kv_lens_host)

    @property
    def num_tokens(self) -> int:
        return self.qo_indptr_host[-1]


class AttentionPlan(ABC):
    """One step's attention, planned: `AttentionBackend.plan(meta)` builds it once per step and
    the model calls `forward` once per layer.

    It holds what the step needs (the metadata, where the new K/V go, which kernels run), so a
    backend keeps no per-step state of its own.
    """

    def __init__(self, meta: AttentionMetadata) -> None:
        self.meta = meta

    @abstractmethod
    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor) -> torch.Tensor:
        """q `[T, Hq, D]`, k and v `[T, Hkv, D]` (rotary already applied), `kv_cache` this
        layer's pool tensor -> attention output `[T, Hq, D]` in q's dtype.

        Writes k and v into the pool at `meta.slot_mapping` first, then attends (scale
        1/sqrt(D), causal as described in this module's docstring).
        """


class AttentionBackend(ABC):
    """Runs paged attention for one model. Built by name (registry.py) with exactly the keyword
    arguments `num_q_heads, num_kv_heads, head_dim, dtype, device, page_size, max_num_seqs`,
    `kv_dtype` (the pool's dtype; None: `dtype`) (a backend may add optional ones of its own;
    an unknown one is a TypeError).

    Contract:
    - `plan(meta) -> AttentionPlan` is called once per step, before any layer runs; it may build
      index buffers or kernel plans. It must not read the KV pool. The plan is valid until the
      backend's next `plan` or `plan_cuda_graph` call (kernel plans may live in objects that
      the backend reuses from step to step).
    - `plan.forward(layer, q, k, v, kv_cache)` is called once per layer (see AttentionPlan).
    - With `meta.cascade` set, the result must equal plain attention up to rounding.
    - `warmup()` may compile or load kernels ahead of the first request.
    - CUDA graphs (engine/cuda_graph.py), only where `supports_cuda_graphs` is True:
      `enable_cuda_graphs(batch_sizes, max_num_indices, scratch_page)` once, then before each
      capture or replay `plan_cuda_graph(meta, batch_size)`, a decode-only step of at most
      `batch_size` requests padded to `batch_size` rows, where `can_graph(meta, batch_size)`.
      A bucket holds a graph per kind of step: `graph_kind(meta, batch_size)` names the one a
      step replays ("decode" without `meta.cascade`; "cascade", or a backend's own cascade
      kinds from `cascade_graph_kinds(batch_size)`), and the runner captures each kind on its
      toy step with `plan_cuda_graph(toy, batch_size, kind)`. Padding rows may read and write
      only the pool's `scratch_page`, which no request owns. `plan_cuda_graph` writes only
      into fixed buffers that the captured kernels read, so a replay needs no new plan object:
      the one returned is for the capture. `max_graph_indices()` is how many `kv_indices` a
      graph step may hold.
    """

    supports_cuda_graphs: bool = False

    def __init__(self, num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str, page_size: int = 16, max_num_seqs: int = 64,
                 kv_dtype: torch.dtype | None = None) -> None:
        self.num_q_heads = num_q_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.kv_dtype = kv_dtype or dtype
        if self.kv_dtype not in (dtype, FP8_KV):
            raise ValueError(f"KV pages of {self.kv_dtype} with a {dtype} model: the pool holds "
                             f"the model's dtype or {FP8_KV}")
        self.device = torch.device(device)
        self.page_size = page_size
        self.max_num_seqs = max_num_seqs  # the most requests in one step
        self.scale = head_dim ** -0.5

    @abstractmethod
    def plan(self, meta: AttentionMetadata) -> AttentionPlan: ...

    def warmup(self) -> None:  # noqa: B027 - optional hook, most backends need none
        """Compile or load kernels ahead of the first request (no-op for the torch backend)."""

    # -- CUDA graphs: implemented by the backends whose `supports_cuda_graphs` is True --------
    def enable_cuda_graphs(self, batch_sizes: list[int], max_num_indices: int,
                           scratch_page: int) -> None:
        """Allocate what graphs of these batch sizes read, for up to `max_num_indices` pages;
        padding rows use `scratch_page`."""
        raise NotImplementedError(f"{type(self).__name__} does not support CUDA graphs")

    def can_graph(self, meta: AttentionMetadata, batch_size: int) -> bool:
        """Whether this decode-only step fits the graph of its kind captured at `batch_size`
        (a backend without cascade graphs keeps this default: plain steps only)."""
        return (meta.num_decode_only and meta.cascade is None
                and meta.kv_indices.numel() <= self.max_graph_indices())

    def plan_cuda_graph(self, meta: AttentionMetadata, batch_size: int,
                        kind: str | None = None) -> AttentionPlan:
        """Plan a decode-only step for the graph of `kind` (None: `graph_kind`) captured at
        `batch_size` (>= meta.batch_size)."""
        raise NotImplementedError(f"{type(self).__name__} does not support CUDA graphs")

    def graph_kind(self, meta: AttentionMetadata, batch_size: int) -> str:
        """The kind of graph a decode step replays at bucket `batch_size`."""
        return "decode" if meta.cascade is None else "cascade"

    def cascade_graph_kinds(self, batch_size: int) -> tuple[str, ...]:
        """The cascade kinds captured at `batch_size` (where the runner captures cascade
        graphs), "cascade" first: a step whose own kind failed to capture replays that one. A
        backend whose `can_graph` refuses cascade steps captures none anyway."""
        return ("cascade",)

    def max_graph_indices(self) -> int:
        """The most `kv_indices` entries that a graph step can hold."""
        raise NotImplementedError(f"{type(self).__name__} does not support CUDA graphs")


def to_kv_dtype(x: torch.Tensor, kv_dtype: torch.dtype) -> torch.Tensor:
    """New K/V in the pool's dtype: unchanged, or fp8 (saturated). The scale is KV_FP8_SCALE =
    1.0, so no division here; reads upcast without a multiply (torch), and FlashInfer runs
    without k_scale / v_scale, which is the same 1.0 (flashinfer_backend.py)."""
    if kv_dtype != FP8_KV:
        return x.to(kv_dtype)
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8_KV)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """An fp8 tensor as uint8 (same memory): indexing kernels (index_put, index_copy,
    index_select) lack float8 versions on some devices; other tensors as they are."""
    return t.view(torch.uint8) if t.dtype == FP8_KV else t


def store_kv(kv_cache: torch.Tensor, index: tuple, x: torch.Tensor) -> None:
    """kv_cache[index] = x, converted to the pool's dtype."""
    as_bytes(kv_cache)[index] = as_bytes(to_kv_dtype(x, kv_cache.dtype))


def load_kv(kv_cache: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """kv_cache[index] along dim 0 (whole pages, or rows of a view of the pool) in float32 (fp8
    pages: times KV_FP8_SCALE = 1.0, i.e. upcast only). index_select, not `kv_cache[index]`: on
    CPU the advanced-indexing kernel copied a step's pages ~10x slower."""
    return as_bytes(kv_cache).index_select(0, index).view(kv_cache.dtype).float()


def write_kv(kv_cache: torch.Tensor, slot_mapping: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor) -> None:
    page_size = kv_cache.shape[2]
    pages, offsets = slot_mapping // page_size, slot_mapping % page_size
    store_kv(kv_cache, (pages, 0, offsets), k)
    store_kv(kv_cache, (pages, 1, offsets), v)

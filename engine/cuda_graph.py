"""CUDA graphs for decode-only steps: the whole forward, embedding to logits, replayed per step.

A decode step of a large model is hundreds of small kernels; launched one by one from Python,
the launches (not the GPU) set the pace at small batches. Graphs are captured per batch-size
bucket (1, 2, 4, ... up to the largest that `max_num_seqs` needs), one for plain decode and,
with `cascade_graphs`, one per cascade kind the backend names (shared-prefix levels,
engine/attention/cascade.py; e.g. FlashInfer's split shared level for one large group); a step
of n requests replays the smallest bucket >= n, the graph of the kind the backend picks for it.
Its extra rows are padding: they keep whatever token and position the buffers last held (any
valid values do) and the backend points their attention and K/V write at the pool's scratch
page, so nothing is copied for them. Prefill, mixed steps, and cascade steps that the
backend's graphs do not fit (too many groups) run eagerly.

Contract with the backend (engine/attention/base.py): `supports_cuda_graphs` is True;
`enable_cuda_graphs(batch_sizes, max_num_indices, scratch_page)` once, then
`plan_cuda_graph(meta, batch_size[, kind])` before each capture or replay, writing only into
buffers that the captured kernels read; `can_graph(meta, batch_size)` says whether a step fits,
`graph_kind(meta, batch_size)` which graph it replays. The plan
it returns runs the captured forward; a replay only needs the buffers refilled. The runner owns
the token and position buffers.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable

import torch

from engine import gemv
from engine.attention.base import AttentionBackend, AttentionMetadata, AttentionPlan
from engine.attention.cascade import CascadeGroup, CascadePlan
from engine.attention.metadata import build_metadata
from engine.kv_pool import KVPool
from engine.model import CausalLM

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
TOY_SHARED_PAGES = 4  # the cascade capture step's shared pages: enough for 4 slices


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """The buckets up to the first one that holds `max_num_seqs` (at most the largest)."""
    sizes = []
    for b in BUCKETS:
        sizes.append(b)
        if b >= max_num_seqs:
            break
    return sizes


def toy_step(b: int, cascade: bool, page_size: int, device: torch.device) -> AttentionMetadata:
    """The step a graph is captured on: b rows at the first slots of pages 0 (plain), or b rows
    sharing TOY_SHARED_PAGES pages (all page 0) as one group, each decoding at the start of page
    0 again (cascade: the bucket's largest group, over enough pages for a shared level cut in
    slices). The pool is still empty at start-up, so what it writes there is overwritten before
    anything reads it."""
    if not cascade:
        return build_metadata([[0]] * b, [0] * b, [1] * b, page_size, device)
    shared = TOY_SHARED_PAGES
    plan = CascadePlan(order=list(range(b)), groups=[CascadeGroup(list(range(b)), shared)])
    return build_metadata([[0] * (shared + 1)] * b, [shared * page_size] * b, [1] * b,
                          page_size, device, plan)


class CudaGraphRunner:
    def __init__(self, model: CausalLM, pool: KVPool, backend: AttentionBackend,
                 max_num_seqs: int, device: torch.device, cascade_graphs: bool = False) -> None:
        # Checked before any CUDA call, so a wrong configuration fails clearly on any machine.
        if not backend.supports_cuda_graphs:
            raise ValueError(f"the {type(backend).__name__} attention backend does not support "
                             "CUDA graphs (supports_cuda_graphs is False); choose one that does "
                             "or turn cuda_graphs off")
        self.model, self.pool, self.backend, self.device = model, pool, backend, device
        self.sizes = graph_batch_sizes(max_num_seqs)
        b_max = self.sizes[-1]
        max_positions = model.rope.cos.shape[0]
        pages_per_seq = -(-max_positions // pool.page_size)
        backend.enable_cuda_graphs(self.sizes, b_max * pages_per_seq, pool.scratch_page)
        self.input_ids = torch.zeros(b_max, dtype=torch.long, device=device)
        self.positions = torch.zeros(b_max, dtype=torch.long, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}  # plain decode, per bucket
        self.logits: dict[int, torch.Tensor] = {}  # [b, vocab] float32, written by each replay
        # cascade decode, per (kind, bucket): kinds from backend.cascade_graph_kinds
        self.cascade_graphs: dict[tuple[str, int], torch.cuda.CUDAGraph] = {}
        self.cascade_logits: dict[tuple[str, int], torch.Tensor] = {}
        self.mempool = torch.cuda.graph_pool_handle()
        self.num_replays = 0
        self.replays_by_kind: collections.Counter[str] = collections.Counter()  # cascade ones
        # Why cascade graphs are missing, if their capture failed: cascade steps then run
        # eagerly (correct, slower) rather than the engine failing to start.
        self.cascade_graph_error: str | None = None
        with torch.inference_mode():
            for b in reversed(self.sizes):  # largest first: the smaller ones reuse its memory
                self._capture(b, self._toy_step(b, cascade=False), self.graphs, self.logits)
                if cascade_graphs and b >= 2 and self.cascade_graph_error is None:
                    self._capture_cascade(b)

    def _capture_cascade(self, b: int) -> None:
        cascade = self._toy_step(b, cascade=True)
        kinds = self.backend.cascade_graph_kinds(b)
        if not kinds or not self.backend.can_graph(cascade, b):
            return
        base, *extra = kinds
        try:
            self._capture(b, cascade, self.cascade_graphs, self.cascade_logits, base)
            for kind in extra:  # without one of these, its steps replay the base kind's graph
                try:
                    self._capture(b, cascade, self.cascade_graphs, self.cascade_logits, kind)
                except Exception as e:  # noqa: BLE001 - reported
                    log.warning("no %s CUDA graph at bucket %d (%s: %s); its steps replay the "
                                "%s graph", kind, b, type(e).__name__, e, base)
        except Exception as e:  # noqa: BLE001 - reported, and cascade steps stay eager
            self.cascade_graph_error = f"bucket {b}: {type(e).__name__}: {e}"
            self.cascade_graphs.clear()
            self.cascade_logits.clear()
            log.warning("cascade CUDA graphs disabled, cascade steps run eagerly (%s)",
                        self.cascade_graph_error)

    def _toy_step(self, b: int, cascade: bool) -> AttentionMetadata:
        return toy_step(b, cascade, self.pool.page_size, self.device)

    def _forward(self, b: int, plan: AttentionPlan) -> torch.Tensor:
        hidden = self.model(self.input_ids[:b], self.positions[:b], self.pool.layers, plan)
        return self.model.logits(hidden)

    def _capture(self, b: int, meta: AttentionMetadata, graphs: dict, logits: dict,
                 kind: str = "decode") -> None:
        """Capture bucket b's graph of `kind` (plain graphs are keyed b, cascade ones (kind, b))."""
        plan = self.backend.plan_cuda_graph(meta, b, kind)
        key = b if kind == "decode" else (kind, b)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        # Graphs take one-row projections through a compiled reduction (engine/gemv.py).
        with gemv.for_cuda_graphs():
            with torch.cuda.stream(stream):  # warm-up: JIT builds, compiles, lazy allocations
                self._forward(b, plan)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.mempool):
                logits[key] = self._forward(b, plan)
        graphs[key] = graph

    @property
    def num_cascade_replays(self) -> int:
        return sum(self.replays_by_kind.values())

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.sizes if b >= n), None)

    def can_run(self, meta: AttentionMetadata) -> bool:
        if not meta.num_decode_only:
            return False
        b = self.bucket(meta.batch_size)
        if b is None or not self.backend.can_graph(meta, b):
            return False
        return meta.cascade is None or (self._kind(meta, b), b) in self.cascade_graphs

    def _kind(self, meta: AttentionMetadata, b: int) -> str:
        """The backend's kind for this step, or "cascade" where that kind's capture failed."""
        kind = self.backend.graph_kind(meta, b)
        return kind if kind in ("decode", "cascade") or (kind, b) in self.cascade_graphs \
            else "cascade"

    def run(self, input_ids: torch.Tensor, meta: AttentionMetadata,
            on_planned: Callable[[], None] | None = None) -> torch.Tensor:
        """Logits [n, vocab] (float32) of a decode-only step; valid until the next replay.
        `on_planned()` runs once the attention plan is queued, before the replay."""
        n = meta.batch_size
        b = self.bucket(n)
        # Refills the buffers that the captured kernels read; the graph replays the capture's
        # plan, so the plan object returned here is not needed.
        kind = self._kind(meta, b)
        self.backend.plan_cuda_graph(meta, b, kind)
        if on_planned is not None:
            on_planned()
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(meta.positions)
        if meta.cascade is None:
            self.graphs[b].replay()
            logits = self.logits[b]
        else:
            self.cascade_graphs[kind, b].replay()
            logits = self.cascade_logits[kind, b]
            self.replays_by_kind[kind] += 1
        self.num_replays += 1
        return logits[:n]

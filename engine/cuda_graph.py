"""CUDA graphs for decode-only steps: the whole forward, embedding to logits, replayed per step.

A decode step of a large model is hundreds of small kernels; launched one by one from Python,
the launches (not the GPU) set the pace at small batches. One graph is captured per batch-size
bucket (1, 2, 4, ... up to the largest that `max_num_seqs` needs); a step of n requests replays
the smallest bucket >= n, its extra rows copying row 0 (see
`FlashInferBackend.plan_cuda_graph`). Prefill, mixed and cascade steps run eagerly.

Contract with the backend (engine/attention/base.py): `supports_cuda_graphs` is True;
`enable_cuda_graphs(batch_sizes, max_num_indices)` once, then `plan_cuda_graph(meta, batch_size)`
before each capture or replay, writing only into buffers that the captured kernels read. The plan
it returns runs the captured forward; a replay only needs the buffers refilled. The runner owns
the token and position buffers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.attention.base import AttentionBackend, AttentionMetadata, AttentionPlan
from engine.attention.metadata import build_metadata
from engine.kv_pool import KVPool
from engine.model import CausalLM

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """The buckets up to the first one that holds `max_num_seqs` (at most the largest)."""
    sizes = []
    for b in BUCKETS:
        sizes.append(b)
        if b >= max_num_seqs:
            break
    return sizes


class CudaGraphRunner:
    def __init__(self, model: CausalLM, pool: KVPool, backend: AttentionBackend,
                 max_num_seqs: int, device: torch.device) -> None:
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
        backend.enable_cuda_graphs(self.sizes, b_max * pages_per_seq)
        self.input_ids = torch.zeros(b_max, dtype=torch.long, device=device)
        self.positions = torch.zeros(b_max, dtype=torch.long, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}  # [b, vocab] float32, written by each replay
        self.mempool = torch.cuda.graph_pool_handle()
        self.num_replays = 0
        with torch.inference_mode():
            for b in reversed(self.sizes):  # largest first: the smaller ones reuse its memory
                self._capture(b)

    def _forward(self, b: int, plan: AttentionPlan) -> torch.Tensor:
        hidden = self.model(self.input_ids[:b], self.positions[:b], self.pool.layers, plan)
        return self.model.logits(hidden)

    def _capture(self, b: int) -> None:
        # A toy step: every row decodes at position 0 of page 0. The pool is still empty at
        # start-up, so what it writes there is overwritten before anything reads it.
        meta = build_metadata([[0]] * b, [0] * b, [1] * b, self.pool.page_size, self.device)
        plan = self.backend.plan_cuda_graph(meta, b)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm-up: JIT builds and lazy allocations happen here
            self._forward(b, plan)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.mempool):
            self.logits[b] = self._forward(b, plan)
        self.graphs[b] = graph

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.sizes if b >= n), None)

    def can_run(self, meta: AttentionMetadata) -> bool:
        return (meta.num_decode_only and meta.cascade is None
                and meta.batch_size <= self.sizes[-1]
                and meta.kv_indices.numel() <= self.backend.max_graph_indices())

    def run(self, input_ids: torch.Tensor, meta: AttentionMetadata,
            on_planned: Callable[[], None] | None = None) -> torch.Tensor:
        """Logits [n, vocab] (float32) of a decode-only step; valid until the next replay.
        `on_planned()` runs once the attention plan is queued, before the replay."""
        n = meta.batch_size
        b = self.bucket(n)
        # Refills the buffers that the captured kernels read; the graph replays the capture's
        # plan, so the plan object returned here is not needed.
        self.backend.plan_cuda_graph(meta, b)
        if on_planned is not None:
            on_planned()
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(meta.positions)
        if b > n:
            self.input_ids[n:b].copy_(input_ids[:1].expand(b - n))
            self.positions[n:b].copy_(meta.positions[:1].expand(b - n))
        self.graphs[b].replay()
        self.num_replays += 1
        return self.logits[b][:n]

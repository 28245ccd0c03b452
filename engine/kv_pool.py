"""The paged KV cache: one tensor `[num_layers, num_pages, 2, page_size, num_kv_heads, head_dim]`;
each layer's attention sees its contiguous slice `[num_pages, 2, page_size, Hkv, D]`, in the
model's dtype or float8_e4m3fn (engine.kv_cache_dtype fp8_e4m3: half the bytes of bf16).

One allocation rather than one per layer so that moving a request's pages in or out is one
kernel over every layer per run of consecutive pages (an import between two decode steps was 32
launches, each a GIL round trip on the step thread)."""

from __future__ import annotations

import torch

from engine.attention.base import as_bytes
from engine.host_copy import index_tensor
from engine.model_arch import ModelArch

# Pages in at most this many runs of consecutive ids move as one slice copy per run, without an
# index tensor: making one (a host-to-device copy through pinned memory) still kept the decode
# replica's step thread in CUDA, GIL released, for ~0.8 ms per import (py-spy, 1P1D on one H200,
# 2026-12-02, docs/benchmarks.md run 51). A fresh request's pages are mostly one or two runs.
MAX_RUN_COPIES = 4


def page_runs(pages: list[int]) -> list[tuple[int, int]]:
    """`pages` as runs of consecutive ids, in order: [(first page, count), ...]."""
    runs: list[tuple[int, int]] = []
    for page in pages:
        if runs and runs[-1][0] + runs[-1][1] == page:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((page, 1))
    return runs


class KVPool:
    def __init__(self, arch: ModelArch, num_pages: int, page_size: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        self.num_pages = num_pages
        self.page_size = page_size
        self.dtype = dtype
        # One page past the allocator's: no request ever owns it. The padding rows of a CUDA
        # graph replay (engine/cuda_graph.py) write their K/V there and attend over it, so that
        # they touch no real page and need no extra kernel to stay out of the way.
        self.scratch_page = num_pages
        self.kv = torch.zeros((arch.num_layers, num_pages + 1, 2, page_size, arch.num_kv_heads,
                               arch.head_dim), dtype=dtype, device=device)
        self.layers = list(self.kv.unbind(0))  # views

    @staticmethod
    def bytes_per_page(arch: ModelArch, page_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return arch.num_layers * 2 * page_size * arch.num_kv_heads * arch.head_dim * elem

    def export_shape(self, num_pages: int) -> tuple[int, ...]:
        """Shape of `num_pages` pages read out: [num_layers, num_pages, 2, page_size, Hkv, D]."""
        return (self.kv.shape[0], num_pages, *self.kv.shape[2:])

    def read_pages(self, pages: list[int]) -> torch.Tensor:
        """[num_layers, len(pages), 2, page_size, Hkv, D] copy of the given pages (a tensor of
        its own, never a view of the pool)."""
        kv, runs = as_bytes(self.kv), page_runs(pages)  # fp8 pages move as bytes
        if not runs:
            out = kv[:, :0].clone()
        elif len(runs) <= MAX_RUN_COPIES:
            out = torch.cat([kv[:, first:first + n] for first, n in runs], dim=1)
        else:
            out = kv.index_select(1, index_tensor(pages, self.kv.device))
        return out.view(self.dtype)

    def write_pages(self, pages: list[int], data: torch.Tensor) -> None:
        """Inverse of read_pages: data [num_layers, len(pages), 2, page_size, Hkv, D]."""
        if data.shape[0] != len(self.layers) or data.shape[1] != len(pages) \
                or tuple(data.shape[2:]) != tuple(self.layers[0].shape[1:]):
            raise ValueError(f"KV payload shape {tuple(data.shape)} does not fit pool pages "
                             f"{tuple(self.layers[0].shape[1:])} x {len(self.layers)} layers")
        src = data.to(self.kv.device, self.dtype, non_blocking=True)
        kv, src_bytes, runs = as_bytes(self.kv), as_bytes(src), page_runs(pages)
        if len(runs) <= MAX_RUN_COPIES:
            done = 0
            for first, n in runs:
                kv[:, first:first + n].copy_(src_bytes[:, done:done + n])
                done += n
        else:
            kv.index_copy_(1, index_tensor(pages, self.kv.device), src_bytes)
        if src.is_cuda:
            # A transport may have made `data` on a stream of its own (kvtransfer/cuda_ipc.py):
            # its memory must not go back to that stream's pool before this copy has run.
            src.record_stream(torch.cuda.current_stream(src.device))

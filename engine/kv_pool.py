"""The paged KV cache: one tensor `[num_layers, num_pages, 2, page_size, num_kv_heads, head_dim]`;
each layer's attention sees its contiguous slice `[num_pages, 2, page_size, Hkv, D]`, in the
model's dtype or float8_e4m3fn (engine.kv_cache_dtype fp8_e4m3: half the bytes of bf16).

One allocation rather than one per layer so that moving a request's pages in or out is one
kernel over every layer (an import between two decode steps was 32 launches, each a GIL
round trip on the step thread)."""

from __future__ import annotations

import torch

from engine.attention.base import as_bytes
from engine.host_copy import index_tensor
from engine.model_arch import ModelArch


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
        """[num_layers, len(pages), 2, page_size, Hkv, D] copy of the given pages."""
        idx = index_tensor(pages, self.kv.device)
        return as_bytes(self.kv).index_select(1, idx).view(self.dtype)

    def write_pages(self, pages: list[int], data: torch.Tensor) -> None:
        """Inverse of read_pages: data [num_layers, len(pages), 2, page_size, Hkv, D]."""
        if data.shape[0] != len(self.layers) or data.shape[1] != len(pages) \
                or tuple(data.shape[2:]) != tuple(self.layers[0].shape[1:]):
            raise ValueError(f"KV payload shape {tuple(data.shape)} does not fit pool pages "
                             f"{tuple(self.layers[0].shape[1:])} x {len(self.layers)} layers")
        idx = index_tensor(pages, self.kv.device)
        src = data.to(self.kv.device, self.dtype, non_blocking=True)
        as_bytes(self.kv).index_copy_(1, idx, as_bytes(src))  # fp8 pages move as bytes
        if src.is_cuda:
            # A transport may have made `data` on a stream of its own (kvtransfer/cuda_ipc.py):
            # its memory must not go back to that stream's pool before this copy has run.
            src.record_stream(torch.cuda.current_stream(src.device))

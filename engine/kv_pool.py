"""The paged KV cache: one tensor per layer, `[num_pages, 2, page_size, num_kv_heads, head_dim]`."""

from __future__ import annotations

import torch

from engine.model_arch import ModelArch


class KVPool:
    def __init__(self, arch: ModelArch, num_pages: int, page_size: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        self.num_pages = num_pages
        self.page_size = page_size
        self.dtype = dtype
        shape = (num_pages, 2, page_size, arch.num_kv_heads, arch.head_dim)
        self.layers = [torch.zeros(shape, dtype=dtype, device=device)
                       for _ in range(arch.num_layers)]

    @staticmethod
    def bytes_per_page(arch: ModelArch, page_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return arch.num_layers * 2 * page_size * arch.num_kv_heads * arch.head_dim * elem

    def export_shape(self, num_pages: int) -> tuple[int, ...]:
        """Shape of `num_pages` pages read out: [num_layers, num_pages, 2, page_size, Hkv, D]."""
        return (len(self.layers), num_pages, *self.layers[0].shape[1:])

    def read_pages(self, pages: list[int]) -> torch.Tensor:
        """[num_layers, len(pages), 2, page_size, Hkv, D] copy of the given pages."""
        idx = torch.tensor(pages, dtype=torch.long, device=self.layers[0].device)
        return torch.stack([layer.index_select(0, idx) for layer in self.layers])

    def write_pages(self, pages: list[int], data: torch.Tensor) -> None:
        """Inverse of read_pages: data [num_layers, len(pages), 2, page_size, Hkv, D]."""
        if data.shape[0] != len(self.layers) or data.shape[1] != len(pages) \
                or tuple(data.shape[2:]) != tuple(self.layers[0].shape[1:]):
            raise ValueError(f"KV payload shape {tuple(data.shape)} does not fit pool pages "
                             f"{tuple(self.layers[0].shape[1:])} x {len(self.layers)} layers")
        idx = torch.tensor(pages, dtype=torch.long, device=self.layers[0].device)
        data = data.to(self.layers[0].device, self.dtype, non_blocking=True)
        for layer, src in zip(self.layers, data):
            layer.index_copy_(0, idx, src)

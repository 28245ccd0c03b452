"""PageImport: where a KV transport may write a reserved request's transferred pages itself,
straight into the KV pool, from a thread and CUDA stream of its own.

Why: the decode replica's step thread otherwise writes the received pages into the pool
between two steps and then frees the received buffer, which together cost it ~1 ms a request
on one H200 (docs/benchmarks.md, run 98's profile), time in which no step is launched. Written
by the transport, the pages need no buffer and no second copy, and the step thread only does
the bookkeeping of the admission.

Contract (the engine makes it, a transport honours it, the scheduler still owns the pages):
- Made on the engine's step thread when the pages are reserved (`Engine.reserve`), for the
  reservation's fresh pages only (blocks from `first_block` on; the cached prefix pages before
  them are shared and never written).
- `ready` was recorded on the engine's stream then. A step launched before it may still touch
  these pages (it ran for a request that has since been freed or preempted, with overlapped
  scheduling); no step launched after it does, as the pages are reserved. So a writer's stream
  waits for `ready` before it writes.
- The payload's page `i` (shape `shape`: [num_layers, len(pages), 2, page_size, Hkv, D], dtype
  `dtype`) goes to pool page `pages[i]` of every layer. A writer checks that shape and dtype
  before it writes anything (a longer payload would overrun into other requests' pages).
- The writer is done (its stream synchronized) before it reports the receive, and never leaves
  a write running behind a failed or cancelled receive.
- Until its receiver calls `Engine.end_import` (the receive ended, or never started), the engine
  keeps the pages reserved, even through an abort (a client gone mid-transfer): the abort is
  carried out then. So no other request is given pages that a transport may still write.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.kv_pool import KVPool, page_runs


@dataclass(frozen=True)
class PageImport:
    device: torch.device
    shape: tuple[int, ...]  # [L, n, 2, page_size, Hkv, D]: the payload that fits
    dtype: torch.dtype
    pages: tuple[int, ...]  # pool page ids, in payload order
    kv_ptr: int  # address of the pool's page 0 of layer 0
    layer_pitch: int  # bytes from one layer's page 0 to the next layer's
    page_bytes: int  # bytes of one page of one layer
    ready: torch.cuda.Event  # see the contract above

    @property
    def num_layers(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return self.num_layers * len(self.pages) * self.page_bytes

    def copies(self, src_ptr: int) -> list[tuple[int, int, int]]:
        """The 2D copies that place a contiguous payload at `src_ptr`: one per run of
        consecutive pool pages, as (destination address, source address, row bytes); every copy
        has `num_layers` rows, `layer_pitch` apart in the pool and `src_pitch` in the payload."""
        out, done = [], 0
        for first, n in page_runs(list(self.pages)):
            out.append((self.kv_ptr + first * self.page_bytes,
                        src_ptr + done * self.page_bytes, n * self.page_bytes))
            done += n
        return out

    @property
    def src_pitch(self) -> int:
        """Bytes from one layer to the next in the payload."""
        return len(self.pages) * self.page_bytes


def page_import(pool: KVPool, pages: list[int]) -> PageImport | None:
    """A PageImport for `pages` of a CUDA pool, its `ready` recorded now on the current stream
    (call it on the step thread, when the pages were just reserved); None for a CPU pool."""
    kv = pool.kv
    if not kv.is_cuda:
        return None
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(kv.device))
    page_bytes = kv[0, 0].numel() * kv.element_size()
    return PageImport(kv.device, pool.export_shape(len(pages)), pool.dtype, tuple(pages),
                      kv.data_ptr(), kv.stride(0) * kv.element_size(), page_bytes, ready)

"""Chunked, asynchronous host <-> device copies of KV through reusable pinned buffers.

A copy from pageable memory makes the CUDA driver stage it through its own small pinned buffer,
synchronously and at a fraction of the link's rate. Here the payload moves in chunks of whole
layers through `num_slots` pinned buffers on a side stream: while the link carries chunk i,
the host copies chunk i-1 between its slot and pageable memory (the object store). Without
CUDA the same chunking runs with no staging, so the chunk protocol is the same on every device.

Contract:
- `to_host(src, sink)`: `src` is a contiguous tensor whose rows (dim 0) are layers, on any
  device; `sink(l0, l1, host)` is called once per chunk, in order, with `host` a CPU tensor
  equal to `src[l0:l1]` that is valid only until `sink` returns (its slot is reused).
  Work enqueued on the caller's current stream before the call (the gather that produced
  `src`) is ordered before the copies.
- `to_device(chunks, out)`: `chunks` yields `(l0, l1, host)` CPU tensors covering `out`'s rows;
  on return `out` holds them and every copy has completed, so any stream may read `out`.
- One transfer at a time per instance (a lock): transfers share one link anyway.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

import torch

DEFAULT_CHUNK_BYTES = 128 << 20  # fewer, larger object-store puts: bench.gpu_transfer


def layer_chunks(num_layers: int, bytes_per_layer: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """[(l0, l1)] covering 0..num_layers in runs of whole layers of at most chunk_bytes (>= 1)."""
    step = max(1, chunk_bytes // max(1, bytes_per_layer))
    return [(lo, min(lo + step, num_layers)) for lo in range(0, num_layers, step)]


class PinnedStaging:
    def __init__(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES, num_slots: int = 2) -> None:
        if chunk_bytes <= 0 or num_slots < 1:
            raise ValueError("chunk_bytes must be > 0 and num_slots >= 1")
        self.chunk_bytes, self.num_slots = chunk_bytes, num_slots
        self._lock = threading.Lock()
        self._slots: list[torch.Tensor] = []  # pinned uint8 buffers, grown on demand
        self._events: list[torch.cuda.Event] = []
        self._stream: torch.cuda.Stream | None = None

    def chunks(self, shape: tuple[int, ...], dtype: torch.dtype) -> list[tuple[int, int]]:
        per_layer = torch.Size(shape[1:]).numel() * torch.empty((), dtype=dtype).element_size()
        return layer_chunks(shape[0], per_layer, self.chunk_bytes)

    def to_host(self, src: torch.Tensor, sink: Callable[[int, int, torch.Tensor], None]) -> None:
        spans = self.chunks(src.shape, src.dtype)
        if src.device.type != "cuda":
            for l0, l1 in spans:
                sink(l0, l1, src[l0:l1])
            return
        with self._lock:
            stream = self._setup(src)
            stream.wait_stream(torch.cuda.current_stream(src.device))
            pending: list[tuple[int, int, torch.Tensor, torch.cuda.Event]] = []
            for i, (l0, l1) in enumerate(spans):
                slot, event = self._slot(i, src[l0:l1])
                with torch.cuda.stream(stream):
                    slot.copy_(src[l0:l1], non_blocking=True)
                    event.record(stream)
                pending.append((l0, l1, slot, event))
                if len(pending) == self.num_slots:  # all slots in flight: drain the oldest
                    self._drain(pending.pop(0), sink)
            while pending:
                self._drain(pending.pop(0), sink)

    def to_device(self, chunks: Iterable[tuple[int, int, torch.Tensor]], out: torch.Tensor) -> None:
        if out.device.type != "cuda":
            for l0, l1, host in chunks:
                out[l0:l1].copy_(host)
            return
        with self._lock:
            stream = self._setup(out)
            # `out` was allocated on the caller's stream; the copies must not overtake that.
            stream.wait_stream(torch.cuda.current_stream(out.device))
            for i, (l0, l1, host) in enumerate(chunks):
                slot, event = self._slot(i, out[l0:l1])
                event.synchronize()  # the slot's previous chunk has left it
                slot.copy_(host)
                with torch.cuda.stream(stream):
                    out[l0:l1].copy_(slot, non_blocking=True)
                    event.record(stream)
            stream.synchronize()

    # -- internals -----------------------------------------------------------------------
    def _setup(self, t: torch.Tensor) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream(t.device)
            self._events = [torch.cuda.Event() for _ in range(self.num_slots)]
        return self._stream

    def _slot(self, i: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
        """Slot i % num_slots viewed as `like`'s shape and dtype (grown if it is too small)."""
        k = i % self.num_slots
        need = like.numel() * like.element_size()
        if k >= len(self._slots) or self._slots[k].numel() < need:
            if k < len(self._slots):
                self._events[k].synchronize()
            buf = torch.empty(max(need, self.chunk_bytes), dtype=torch.uint8, pin_memory=True)
            if k < len(self._slots):
                self._slots[k] = buf
            else:
                self._slots.append(buf)
        view = self._slots[k][:need].view(like.dtype).view(like.shape)
        return view, self._events[k]

    @staticmethod
    def _drain(item: tuple[int, int, torch.Tensor, torch.cuda.Event],
               sink: Callable[[int, int, torch.Tensor], None]) -> None:
        l0, l1, slot, event = item
        event.synchronize()
        sink(l0, l1, slot)

"""A prompt's KV, exported layer by layer while the step that completes the prompt runs, so that
a transport can send layer i while layers i+1.. are still being computed.

The engine allocates `data` when the request starts its last prompt step and copies each layer's
pages into it right after that layer's attention has written them (`ModelRunner`'s layer hook).
A sender thread waits for the layers it needs with `wait`. Producer and consumers are on
different threads: a condition variable orders them, and on CUDA each layer's copy is followed by
an event that the consumer synchronizes before reading.

Contract: `publish(layer)` is called for layers 0, 1, ... in order, each once, by one thread;
`fail(reason)` (the request was aborted or the step failed) wakes every waiter with an error;
`wait(n, deadline)` returns once layers 0..n-1 are readable, or raises.
"""

from __future__ import annotations

import threading
import time

import torch

from engine.attention.base import as_bytes
from engine.host_copy import index_tensor


class KVStreamFailed(RuntimeError):
    pass


class LayerwiseExport:
    def __init__(self, first_block: int, num_pages: int) -> None:
        self.first_block, self.num_pages = first_block, num_pages
        self.data: torch.Tensor | None = None  # [L, num_pages, 2, page_size, Hkv, D]
        self._cond = threading.Condition()
        self._ready = 0
        self._events: list[torch.cuda.Event | None] = []
        self._error: str | None = None

    def allocate(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        with self._cond:
            self.data = torch.empty(shape, dtype=dtype, device=device)
            self._cond.notify_all()

    def publish(self, layer: int) -> None:
        """Layer `layer`'s pages are in `data` (enqueued on the current stream, on CUDA)."""
        event = None
        if self.data is not None and self.data.is_cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.data.device))
        with self._cond:
            if layer != self._ready:
                raise ValueError(f"layer {layer} published after {self._ready - 1}")
            self._events.append(event)
            self._ready += 1
            self._cond.notify_all()

    def fail(self, reason: str) -> None:
        with self._cond:
            if self._error is None:
                self._error = reason
            self._cond.notify_all()

    @property
    def failed(self) -> bool:
        with self._cond:
            return self._error is not None

    @property
    def layers_ready(self) -> int:
        with self._cond:
            return self._ready

    def wait_allocated(self, deadline: float) -> torch.Tensor:
        """`data`, once the engine has allocated it."""
        with self._cond:
            self._block(lambda: self.data is not None, deadline)
            assert self.data is not None
            return self.data

    def wait(self, num_layers: int, deadline: float) -> None:
        """Until layers 0..num_layers-1 are readable from any stream (`time.monotonic` deadline)."""
        with self._cond:
            self._block(lambda: self._ready >= num_layers, deadline)
            event = self._events[num_layers - 1] if num_layers else None
        if event is not None:
            event.synchronize()  # the copies of layers < num_layers were enqueued before it

    def _block(self, done, deadline: float) -> None:
        while not done():
            if self._error is not None:
                raise KVStreamFailed(self._error)
            left = deadline - time.monotonic()
            if left <= 0:
                raise KVStreamFailed("timed out waiting for the prefill's layers")
            self._cond.wait(left)

    def fill(self, data: torch.Tensor) -> None:
        """All layers at once (the last prompt step ran without the layer hook)."""
        with self._cond:
            if self._ready:
                raise ValueError("fill after layers were published")
            self.data = data
        for layer in range(data.shape[0]):
            self.publish(layer)


class LayerExporter:
    """One step's layer hook: after layer i ran, copies layer i's pages of every request whose
    last prompt step this is (and that streams its KV) into its LayerwiseExport."""

    def __init__(self, items: list[tuple[LayerwiseExport, torch.Tensor]],
                 layers: list[torch.Tensor]) -> None:
        self.items, self.layers = items, layers

    @staticmethod
    def for_step(reqs: list, num_new: list[int], pool, device: torch.device,
                 ) -> LayerExporter | None:
        """`reqs` and `num_new` as scheduled (engine.request.Request); `pool` a KVPool."""
        items = []
        for r, n in zip(reqs, num_new):
            s = r.kv_stream
            if not (isinstance(s, LayerwiseExport) and s.layers_ready == 0
                    and r.num_computed_tokens + n == r.num_prompt_tokens):
                continue
            pages = r.block_table[s.first_block:s.first_block + s.num_pages]
            if s.data is None:
                s.allocate(pool.export_shape(s.num_pages), pool.dtype, device)
            items.append((s, index_tensor(pages, device)))
        return LayerExporter(items, pool.layers) if items else None

    def on_layer(self, layer: int) -> None:
        for stream, idx in self.items:
            assert stream.data is not None
            # as bytes: fp8 pools have no float8 index_select on every device
            torch.index_select(as_bytes(self.layers[layer]), 0, idx,
                               out=as_bytes(stream.data[layer]))
            stream.publish(layer)

"""IpcExports: the `cuda_ipc` sender's ledger of the pages it shared, so that it holds none of
them past its `timeout_s` (the KVTransport contract), even when the receiver died holding a
handle.

Why: torch keeps a shared block until the receiver releases the reference counter that came
with the handle (kvtransfer/cuda_ipc.py). A decode replica that dies between getting a handle
and its copy's end would pin the block on the prefill replica's GPU for good: 64 MiB for one
512-token Llama-3-8B prompt, and a decode replica has tens of prompts in flight.

Contract:
- `add(ref_counter, device)` at each export returns `accept_by`: the time after which a receiver
  must refuse the handle (raise KVTransferLost, and release nothing). The sender drops the
  receiver's reference itself at `release_at` = the export + `timeout_s`; `accept_by` is
  `margin` of `timeout_s` before that (60 s for the default 600 s), the time a receiver that
  accepted in time has to finish its copy and release.
- `drop(ref_counter)` drops the receiver's reference of one export now and forgets it: for a
  handle that never left the sender (`CudaIpcTransport.discard`). False if it is not held.
- `expire()` (the sender calls it before each export) drops the reference of every export past
  its `release_at` and forgets it. It cannot tell a dead receiver from one that released in
  time, so it drops both: the latter leaves torch's counter at -1, which is harmless, as torch
  frees a block whose counter is not positive and never hands a counter's slot out again; and
  once torch has freed every block of a counter file, the file is gone and torch's release
  does nothing (it ignores a missing file: `_release_ipc_counter`, torch/csrc/StorageSharing.cpp;
  torch/csrc/CudaIPCTypes.cpp for the rest). A release that fails anyway is logged, never
  raised: `send` calls `expire`.
- Times are `time.monotonic()`: CLOCK_MONOTONIC on Linux, one clock for every process of the
  host, and `cuda_ipc`'s two sides share a GPU, hence a host.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

RefCounter = tuple[bytes, int]  # torch's (counter file, offset) that came with a handle


@dataclass(frozen=True)
class _Export:
    ref_counter: RefCounter
    device: int
    release_at: float


def release_reference(ref_counter: RefCounter, device: int) -> None:
    """Drop one reference on a shared block, as its receiver would (any process may)."""
    import torch

    torch.UntypedStorage._release_ipc_counter(*ref_counter, device=torch.device("cuda", device))


class IpcExports:
    def __init__(self, timeout_s: float, margin: float = 0.1,
                 clock: Callable[[], float] = time.monotonic,
                 release: Callable[[RefCounter, int], None] = release_reference) -> None:
        if not 0 < margin < 1:
            raise ValueError(f"margin is a fraction of timeout_s, in (0, 1); got {margin}")
        self.timeout_s, self.margin = timeout_s, margin
        self.clock, self.release = clock, release
        self._held: deque[_Export] = deque()  # in export order, so in `release_at` order
        self._lock = threading.Lock()  # sends run in worker threads

    def add(self, ref_counter: RefCounter, device: int) -> float:
        """Record an export made now; returns its `accept_by`."""
        now = self.clock()
        with self._lock:
            self._held.append(_Export(ref_counter, device, now + self.timeout_s))
        return now + (1 - self.margin) * self.timeout_s

    def drop(self, ref_counter: RefCounter) -> bool:
        """Drop one export's receiver reference now and forget it; False if it is not held."""
        with self._lock:
            export = next((e for e in self._held if e.ref_counter == ref_counter), None)
            if export is None:
                return False
            self._held.remove(export)
        self._release(export)
        return True

    def expire(self) -> int:
        """Drop the receiver's reference of every export past its `release_at`; returns how many
        were dropped."""
        now, due = self.clock(), []
        with self._lock:
            while self._held and self._held[0].release_at <= now:
                due.append(self._held.popleft())
        for export in due:
            self._release(export)
        return len(due)

    def _release(self, export: _Export) -> None:
        try:
            self.release(export.ref_counter, export.device)
        except Exception as e:  # noqa: BLE001 - a send must not fail for it
            # At worst the block stays pinned, as it did before this ledger.
            log.warning("could not drop a cuda_ipc export's reference %r: %r",
                        export.ref_counter, e)

    def __len__(self) -> int:
        return len(self._held)


def refused(accept_by: float, clock: Callable[[], float] = time.monotonic) -> bool:
    """(Receiver.) Whether a handle came too late to be taken: its sender may free the pages
    while the copy runs."""
    return clock() > accept_by

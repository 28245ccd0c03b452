"""The KV transport contract. Implementations are chosen by name in kvtransfer/registry.py."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from engine.kv_stream import LayerwiseExport
from engine.page_import import PageImport
from kvtransfer.payload import KVPayload


class KVTransferLost(RuntimeError):
    """The KV of a transfer is gone: its sender died, the channel broke, or the sender dropped
    the pages after waiting `timeout_s` for the receiver. Retry the prefill elsewhere."""


class KVTransport(ABC):
    """Moves one KVPayload from a sender replica to a receiver replica.

    Contract:
    - `send(payload)` runs on the sender, in a worker thread (it may block on copies), with
      `payload.data` on the sender's engine device, produced on that thread's current stream.
      It returns a small picklable handle that travels in the prefill response; the pages stay
      retrievable until the receiver has taken them (or the sender dies: `receive` raises).
    - `receive(handle, device)` runs on the receiver and returns the payload (awaitable) with
      `data` on `device`, completely written: any stream may read it.
    - `receive_into(handle, target)` does the same for a reserved request whose pool pages
      are described by `target` (engine/page_import.py, whose contract it honours). A transport
      that can write there itself does, and returns the payload's header (`data` a meta
      tensor); it returns or raises, even cancelled, only once nothing more will be written.
      The others return `receive(handle, target.device)`, for the engine to write.
    - `release(handle, device)` runs on a receiver that will not read the handle's KV (its
      request ended meanwhile): the sender may let the pages go. The default receives the
      payload and drops it; a transport that can let go without moving the bytes does.
    - `discard(handle)` runs on the sender, for a handle `send` made that will reach no
      receiver (the prefill's caller left while it was sent): what the handle holds is let go
      now, not at `timeout_s`. Never for a handle that left the sender.
    - Bytes moved are counted by the receiver (`KVPayload.nbytes`).
    - A sender holds a payload for at most `timeout_s` (the request timeout) waiting for its
      receiver; a receive whose KV is gone raises KVTransferLost.
    - A transport whose handles hold Ray object refs says so (`handle_holds_object_refs`):
      such a handle travels only as a Serve call's return value, not inside an item a streaming
      call yields, since Ray can lose the count of refs nested in those (ray-project/ray#58080;
      seen here as ReferenceCountingAssertionError), so the decode side calls the prefill
      deployment once per prompt for it (decode/deployment.py).
    - Transports with `supports_layerwise` also take `send_layerwise(header, export)` before the
      prefill runs: the handle is returned at once and each layer goes out as the engine
      publishes it into `export` (engine/kv_stream.py), so the transfer overlaps the prefill;
      `receive` of that handle returns once every layer has arrived.
    """

    supports_layerwise = False
    handle_holds_object_refs = False

    def __init__(self, timeout_s: float = 600.0) -> None:
        self.timeout_s = timeout_s

    def close(self) -> None:
        """Release what the transport holds (threads, sockets); idempotent. Most hold
        nothing."""
        return None

    def counters(self) -> dict[str, float]:
        """This transport's own running totals for the receiving replica's /metrics, by metric
        name (`pdserve_kv_transfer_*_total`); none for most."""
        return {}

    @abstractmethod
    def send(self, payload: KVPayload) -> object: ...

    def discard(self, handle: object) -> None:
        """Nothing to let go where a handle's pages die with it (inline; Ray object refs, which
        Ray frees once no ref is left)."""
        return None

    @abstractmethod
    async def receive(self, handle: object, device: torch.device | str) -> KVPayload: ...

    async def receive_into(self, handle: object, target: PageImport) -> KVPayload:
        return await self.receive(handle, target.device)

    async def release(self, handle: object, device: torch.device | str) -> None:
        await self.receive(handle, device)

    def send_layerwise(self, header: KVPayload, export: LayerwiseExport) -> object:
        """`header` describes the payload (its data a meta tensor of the final shape)."""
        raise NotImplementedError(f"{type(self).__name__} sends whole payloads only")


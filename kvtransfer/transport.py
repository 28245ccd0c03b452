"""The KV transport contract and the choice of implementation by name."""

from __future__ import annotations

from abc import ABC, abstractmethod

from kvtransfer.payload import KVPayload


class KVTransport(ABC):
    """Moves one KVPayload from a sender replica to a receiver replica.

    Contract:
    - `send(payload)` runs on the sender and returns a small picklable handle that travels in
      the prefill response; the payload stays retrievable until the receiver has taken it
      (or the sender dies, in which case `receive` raises).
    - `receive(handle)` runs on the receiver and returns the payload (awaitable).
    - Bytes moved are counted by the receiver (`KVPayload.nbytes`).
    """

    name: str
    keeps_device: bool = False  # payload data stays a device tensor (the transport maps it)

    @abstractmethod
    def send(self, payload: KVPayload) -> object: ...

    @abstractmethod
    async def receive(self, handle: object) -> KVPayload: ...


def make_transport(name: str) -> KVTransport:
    if name == "ray":
        from kvtransfer.ray_object_store import RayObjectStoreTransport

        return RayObjectStoreTransport()
    if name == "cuda_ipc":
        from kvtransfer.cuda_ipc import CudaIpcTransport

        return CudaIpcTransport()
    if name == "inline":
        from kvtransfer.inline import InlineTransport

        return InlineTransport()
    raise ValueError(f"unknown KV transport {name!r} (choose 'ray', 'cuda_ipc' or 'inline')")

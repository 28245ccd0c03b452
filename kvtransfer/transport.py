"""The KV transport contract. Implementations are chosen by name in kvtransfer/registry.py."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from kvtransfer.payload import KVPayload


class KVTransport(ABC):
    """Moves one KVPayload from a sender replica to a receiver replica.

    Contract:
    - `send(payload)` runs on the sender, in a worker thread (it may block on copies), with
      `payload.data` on the sender's engine device, produced on that thread's current stream.
      It returns a small picklable handle that travels in the prefill response; the pages stay
      retrievable until the receiver has taken them (or the sender dies: `receive` raises).
    - `receive(handle, device)` runs on the receiver and returns the payload (awaitable) with
      `data` on `device`, completely written: any stream may read it.
    - Bytes moved are counted by the receiver (`KVPayload.nbytes`).
    """

    @abstractmethod
    def send(self, payload: KVPayload) -> object: ...

    @abstractmethod
    async def receive(self, handle: object, device: torch.device | str) -> KVPayload: ...


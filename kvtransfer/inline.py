"""The payload travels inside the response itself: for in-process use and unit tests."""

from __future__ import annotations

import dataclasses

import torch

from kvtransfer.payload import KVPayload
from kvtransfer.transport import KVTransport


class InlineTransport(KVTransport):

    def send(self, payload: KVPayload) -> object:
        return payload

    async def receive(self, handle: object, device: torch.device | str) -> KVPayload:
        if not isinstance(handle, KVPayload):
            raise TypeError(f"inline transport got {type(handle).__name__}, not a KVPayload")
        return dataclasses.replace(handle, data=handle.data.to(device))

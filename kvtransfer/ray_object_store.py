"""KV pages through Ray's object store: zero-copy reads on one node, Ray's transfer across.

The pages travel as one object per chunk of whole layers (raw bytes; numpy has no bfloat16),
so device <-> host copies through pinned buffers overlap the object-store copies
(`PinnedStaging`), and across nodes Ray pulls the chunks in parallel.
"""

from __future__ import annotations

import asyncio
import dataclasses
import warnings

import numpy as np
import ray
import torch

from kvtransfer.payload import KVPayload
from kvtransfer.pinned_staging import DEFAULT_CHUNK_BYTES, PinnedStaging
from kvtransfer.transport import KVTransport


@dataclasses.dataclass
class ObjectStoreHandle:
    header: KVPayload  # the payload with its data as a meta tensor (shape and dtype only)
    chunks: list[tuple[int, int, ray.ObjectRef]]  # (l0, l1, ref of layers l0..l1-1 as bytes)


class RayObjectStoreTransport(KVTransport):
    handle_holds_object_refs = True

    def __init__(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES, timeout_s: float = 600.0) -> None:
        super().__init__(timeout_s)
        self.staging = PinnedStaging(chunk_bytes)

    def send(self, payload: KVPayload) -> object:
        chunks: list[tuple[int, int, ray.ObjectRef]] = []

        def put(l0: int, l1: int, host: torch.Tensor) -> None:
            chunks.append((l0, l1, ray.put(host.reshape(-1).view(torch.uint8).numpy())))

        self.staging.to_host(payload.data.contiguous(), put)
        # A list, so that Serve passes the refs through instead of resolving them on the way.
        return [ObjectStoreHandle(payload.header(), chunks)]

    async def release(self, handle: object, device: torch.device | str) -> None:
        """Nothing to fetch: Ray frees the chunks once no ref to them is left."""
        return None

    async def receive(self, handle: object, device: torch.device | str) -> KVPayload:
        (h,) = handle
        if not isinstance(h, ObjectStoreHandle):
            raise TypeError(f"ray transport got {type(h).__name__}, not an ObjectStoreHandle")
        arrays = await asyncio.gather(*(ref for _, _, ref in h.chunks))
        meta = h.header.data
        out = torch.empty(meta.shape, dtype=meta.dtype, device=device)
        host = [(l0, l1, _as_tensor(a, meta.dtype, (l1 - l0, *meta.shape[1:])))
                for (l0, l1, _), a in zip(h.chunks, arrays)]
        await asyncio.to_thread(self.staging.to_device, host, out)
        return dataclasses.replace(h.header, data=out)


def _as_tensor(raw: np.ndarray, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    # The object store hands out read-only zero-copy arrays; they are only ever read.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(raw).view(dtype).view(shape)

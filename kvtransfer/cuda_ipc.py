"""KV pages GPU to GPU on one node, never through host memory: the sender's page tensor travels
as a CUDA IPC handle (torch's multiprocessing reductions) and the receiver maps it.

Lifetime: torch counts the receiver's references to a shared block; the sender keeps the block
until they reach zero, and frees it on a later `torch.cuda.ipc_collect()`, which `send` calls.
Both replicas must see the same GPU (e.g. `num_gpus: 0.5` each on one device); across GPUs or
nodes use the `ray` transport.

The receiver copies the mapped pages into its own memory and lets go of the mapping in a worker
thread, on a stream of its own, before `receive` returns. Releasing a mapped tensor makes torch
synchronize the releasing thread's current stream (so that the sender may reuse the block), and
it does so holding the GIL: released by the engine's step thread, as it used to be, that waited
for the decode step in flight (7.4-7.9 ms per import with an 8 ms step queued, `python -m
bench.gpu_ipc_admit --busy-ms 8`) and stalled every Python thread of the replica meanwhile. On
the transfer's own stream it waits only for this transfer's copy. The copy costs one read and
one write of the pages on the GPU (64 MiB for a 512-token Llama-3-8B prompt: ~30 us at H200
bandwidth) and as much memory while the request waits to be admitted; at most
`max_concurrent` receives copy at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import pickle
import threading
import weakref
from multiprocessing.reduction import ForkingPickler

import torch
import torch.multiprocessing  # noqa: F401  (registers the CUDA tensor reductions)

from kvtransfer.payload import KVPayload
from kvtransfer.transport import KVTransport


class CudaIpcTransport(KVTransport):

    def __init__(self, timeout_s: float = 600.0, max_concurrent: int = 4) -> None:
        super().__init__(timeout_s)
        self.max_concurrent = max_concurrent
        self._slots: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # per event loop
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._lock = threading.Lock()

    def send(self, payload: KVPayload) -> object:
        if not (isinstance(payload.data, torch.Tensor) and payload.data.is_cuda):
            raise ValueError("cuda_ipc transport needs the KV pages on a CUDA device")
        torch.cuda.ipc_collect()  # free blocks that earlier receivers have released
        return bytes(ForkingPickler.dumps(payload))

    async def receive(self, handle: object, device: torch.device | str) -> KVPayload:
        if not isinstance(handle, bytes):
            raise TypeError(f"cuda_ipc transport got {type(handle).__name__}, not bytes")
        want = torch.device(device)
        if want.type == "cuda" and want.index is None:
            want = torch.device("cuda", torch.cuda.current_device())
        loop = asyncio.get_running_loop()
        slots = self._slots.get(loop)
        if slots is None:
            slots = self._slots[loop] = asyncio.Semaphore(self.max_concurrent)
        async with slots:
            return await asyncio.to_thread(self.take, handle, want)

    def take(self, handle: bytes, want: torch.device) -> KVPayload:
        """(A worker thread; blocks.) Map the sender's pages, copy them, release the mapping."""
        stream = self._stream(want)
        with torch.cuda.stream(stream):
            # Unpickling maps the block and queues, on this (current) stream, a wait for the
            # sender's event recorded after its gather.
            mapped = pickle.loads(handle)
            if mapped.data.device != want:
                raise ValueError(f"cuda_ipc transport: pages are on {mapped.data.device}, "
                                 f"the receiver runs on {want}; use the 'ray' transport "
                                 f"across GPUs")
            data = mapped.data.clone()
            stream.synchronize()  # (GIL released) the copy is done: any stream may read it
            payload = dataclasses.replace(mapped, data=data)
            del mapped  # the mapping's last reference: torch syncs this stream, idle by now
        return payload

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        with self._lock:
            stream = self._streams.get(device)
            if stream is None:
                stream = self._streams[device] = torch.cuda.Stream(device)
            return stream

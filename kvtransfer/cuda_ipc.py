"""KV pages GPU to GPU on one node, never through host memory: the sender's page tensor travels
as a CUDA IPC handle (torch's multiprocessing reductions) and the receiver maps it.

Lifetime: torch counts the receiver's references to a shared block; the sender keeps the block
until they reach zero, and frees it on a later `torch.cuda.ipc_collect()`, which `send` calls.
Ordering: the handle carries an event of the sender's stream, so the receiver's reads wait for
the sender's gather. Both replicas must see the same GPU (e.g. `num_gpus: 0.5` each on one
device); across GPUs or nodes use the `ray` transport.
"""

from __future__ import annotations

import pickle
from multiprocessing.reduction import ForkingPickler

import torch
import torch.multiprocessing  # noqa: F401  (registers the CUDA tensor reductions)

from kvtransfer.payload import KVPayload
from kvtransfer.transport import KVTransport


class CudaIpcTransport(KVTransport):

    def send(self, payload: KVPayload) -> object:
        if not (isinstance(payload.data, torch.Tensor) and payload.data.is_cuda):
            raise ValueError("cuda_ipc transport needs the KV pages on a CUDA device")
        torch.cuda.ipc_collect()  # free blocks that earlier receivers have released
        return bytes(ForkingPickler.dumps(payload))

    async def receive(self, handle: object, device: torch.device | str) -> KVPayload:
        if not isinstance(handle, bytes):
            raise TypeError(f"cuda_ipc transport got {type(handle).__name__}, not bytes")
        payload = pickle.loads(handle)
        want = torch.device(device)
        if want.type == "cuda" and want.index is None:
            want = torch.device("cuda", torch.cuda.current_device())
        if payload.data.device != want:
            raise ValueError(f"cuda_ipc transport: pages are on {payload.data.device}, the "
                             f"receiver runs on {device}; use the 'ray' transport across GPUs")
        return payload

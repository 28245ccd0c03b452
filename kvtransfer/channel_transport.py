"""KV over point-to-point channels per (prefill, decode) pair: `nccl` GPU to GPU across devices
and nodes with no host copy, `gloo` the same protocol on CPU (what CI runs).

The sender holds the gathered payload and returns a handle naming its channel address and
transfer id; the receiver pulls the bytes over its channel with that sender (pairing on first
use). Pages travel in chunks of whole layers (`chunk_bytes`), each received in place into the
receiver's buffer. With `send_layerwise` the handle exists before the prefill runs, and each
chunk leaves as soon as the engine has computed its layers. A lost sender, a broken channel or
an expired payload raise KVTransferLost, which the decode side treats like a lost prefill
replica (it retries the prefill elsewhere).
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import torch

from engine.kv_stream import LayerwiseExport
from kvtransfer.channel_receiver import ChannelReceiver
from kvtransfer.channel_sender import ChannelSender
from kvtransfer.pair_channel import ChannelAddress
from kvtransfer.payload import KVPayload
from kvtransfer.pinned_staging import layer_chunks
from kvtransfer.transport import KVTransport

DEFAULT_CHUNK_BYTES = 64 << 20


@dataclasses.dataclass
class ChannelHandle:
    address: ChannelAddress
    transfer_id: int
    header: KVPayload  # the payload with its data as a meta tensor (shape and dtype only)
    spans: list[tuple[int, int]]  # layer runs, in the order they are sent


def node_address() -> str:
    """This node's address as other nodes reach it (Ray's view when in a Ray worker)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return "127.0.0.1"


class ChannelTransport(KVTransport):
    backend = "gloo"

    def __init__(self, timeout_s: float = 600.0, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 host: str | None = None) -> None:
        super().__init__(timeout_s)
        self.chunk_bytes, self.host = chunk_bytes, host
        self._lock = threading.Lock()
        self._sender: ChannelSender | None = None
        self._receiver: ChannelReceiver | None = None

    @property
    def sender(self) -> ChannelSender:
        with self._lock:  # made on the first send: a decode replica never hosts a store
            if self._sender is None:
                self._sender = ChannelSender(self.backend, self.host or node_address(),
                                             self.timeout_s)
            return self._sender

    @property
    def receiver(self) -> ChannelReceiver:
        with self._lock:
            if self._receiver is None:
                self._receiver = ChannelReceiver(self.backend, self.host or node_address(),
                                                 self.timeout_s)
            return self._receiver

    supports_layerwise = True

    def send(self, payload: KVPayload) -> object:
        data = payload.data.contiguous()
        if (self.backend == "nccl") != data.is_cuda:
            raise ValueError(f"{self.backend} transport got KV pages on {data.device}")
        return self._offer(payload.header(), data)

    def send_layerwise(self, header: KVPayload, export: LayerwiseExport) -> object:
        return self._offer(header, export)

    def _offer(self, header: KVPayload, data: torch.Tensor | LayerwiseExport) -> ChannelHandle:
        meta = header.data
        per_layer = meta[0].numel() * meta.element_size() if meta.shape[0] else 1
        spans = layer_chunks(meta.shape[0], per_layer, self.chunk_bytes)
        sender = self.sender
        return ChannelHandle(sender.address, sender.offer(data, spans), header, spans)

    def discard(self, handle: object) -> None:
        self.sender.withdraw(handle.transfer_id)

    async def receive(self, handle: object, device: torch.device | str) -> KVPayload:
        if not isinstance(handle, ChannelHandle):
            raise TypeError(f"{self.backend} transport got {type(handle).__name__}, "
                            "not a ChannelHandle")
        meta = handle.header.data
        data = await asyncio.to_thread(self.receiver.fetch, handle.address, handle.transfer_id,
                                       tuple(meta.shape), meta.dtype, handle.spans,
                                       torch.device(device))
        return dataclasses.replace(handle.header, data=data)

    def close(self) -> None:
        with self._lock:
            sender, receiver = self._sender, self._receiver
            self._sender = self._receiver = None
        if sender is not None:
            sender.close()
        if receiver is not None:
            receiver.close()


class GlooTransport(ChannelTransport):
    backend = "gloo"


class NcclTransport(ChannelTransport):
    backend = "nccl"

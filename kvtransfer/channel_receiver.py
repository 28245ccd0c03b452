"""The receiving end of the KV channels (a decode replica): PairChannels to each sender, made
when transfers from that sender arrive and kept for the next ones.

Pairing: connect to the sender's store, push a fresh pair id onto its `pairs` queue, and build
rank 1 of the pair's group (the sender's listener builds rank 0). A fetch pushes the transfer
id onto its channel's queue and receives the header, then the layer spans into one buffer.

A channel carries one fetch at a time, and a layer-wise fetch holds its channel until the
prefill's last layer is computed. So that a long prompt does not hold up the transfers of
shorter ones behind it, a fetch takes a free channel to its sender or opens another, up to
MAX_CHANNELS_PER_SENDER (then it waits for one to come free). A channel that breaks is dropped
and its fetch raises KVTransferLost; later transfers from that sender pair again.
"""

from __future__ import annotations

import threading
import time
import uuid

import torch

from kvtransfer.pair_channel import (
    OK,
    STOP,
    ChannelAddress,
    PairChannel,
    connect_store,
    wire_device,
)
from kvtransfer.transport import KVTransferLost

MAX_CHANNELS_PER_SENDER = 8


class _Peer:
    """The channels to one sender: idle ones, and how many exist (idle or in use)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.idle: list[PairChannel] = []
        self.count = 0


class ChannelReceiver:
    def __init__(self, backend: str, host: str, timeout_s: float,
                 max_channels: int = MAX_CHANNELS_PER_SENDER) -> None:
        self.backend, self.host, self.timeout_s = backend, host, timeout_s  # host: this node
        self.max_channels = max_channels
        self._lock = threading.Lock()
        self._peers: dict[ChannelAddress, _Peer] = {}
        self.bytes_received = 0  # counted per span, as it lands

    def fetch(self, addr: ChannelAddress, tid: int, shape: tuple[int, ...], dtype: torch.dtype,
              spans: list[tuple[int, int]], device: torch.device) -> torch.Tensor:
        """Transfer `tid` from the sender at `addr`, as a tensor of `shape` on `device`."""
        deadline = time.monotonic() + self.timeout_s
        with self._lock:
            peer = self._peers.setdefault(addr, _Peer())
        channel = self._take(peer, addr, deadline)
        try:
            out = self._fetch(channel, tid, shape, dtype, spans, device, deadline)
        except BaseException:
            channel.close()  # broken, or left mid-transfer: never reused
            with peer.cond:
                peer.count -= 1
                peer.cond.notify()
            raise
        with peer.cond:
            peer.idle.append(channel)
            peer.cond.notify()
        if isinstance(out, str):  # the channel is fine; the payload is not there
            raise KVTransferLost(f"KV of transfer {tid} {out}")
        return out

    def close(self) -> None:
        with self._lock:
            peers, self._peers = list(self._peers.values()), {}
        for peer in peers:
            with peer.cond:
                idle, peer.idle = peer.idle, []
            for channel in idle:  # channels in use close when their fetch fails
                try:  # ends the sender's pair thread; it may be gone already
                    channel.store.queue_push(channel.fetch_key, STOP)
                except Exception:
                    pass
                channel.close()

    def _take(self, peer: _Peer, addr: ChannelAddress, deadline: float) -> PairChannel:
        """An idle channel to `addr`, or a new one while there are fewer than the maximum."""
        with peer.cond:
            while not peer.idle and peer.count >= self.max_channels:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise KVTransferLost(f"no free KV channel to {addr.host}:{addr.port}")
                peer.cond.wait(left)
            if peer.idle:
                return peer.idle.pop()
            peer.count += 1
        try:
            return self._connect(addr)
        except BaseException:
            with peer.cond:
                peer.count -= 1
                peer.cond.notify()
            raise

    @property
    def num_channels(self) -> int:
        with self._lock:
            peers = list(self._peers.values())
        return sum(p.count for p in peers)

    def _connect(self, addr: ChannelAddress) -> PairChannel:
        store = connect_store(addr, self.timeout_s)
        pair_id = uuid.uuid4().hex
        try:
            store.queue_push("pairs", pair_id)
            return PairChannel(self.backend, store, pair_id, 1, self.host, self.timeout_s)
        except KVTransferLost:
            raise
        except Exception as e:
            raise KVTransferLost(f"KV pairing with {addr.host}:{addr.port} failed: {e}") from e

    def _fetch(self, channel: PairChannel, tid: int, shape: tuple[int, ...], dtype: torch.dtype,
               spans: list[tuple[int, int]], device: torch.device, deadline: float,
               ) -> torch.Tensor | str:
        """The payload's bytes, or why the sender has none to send."""
        try:
            channel.store.queue_push(channel.fetch_key, str(tid))
        except Exception as e:  # the sender's store is gone with the sender
            raise KVTransferLost(f"KV sender of transfer {tid} is gone: {e}") from e
        wire = wire_device(self.backend, device)
        header = torch.zeros(2, dtype=torch.int64, device=wire)
        channel.recv(header, deadline)
        status, echoed = header.tolist()
        if echoed != tid:
            raise KVTransferLost(f"KV channel out of step: got transfer {echoed}, asked {tid}")
        if status != OK:
            return (f"not held by its sender (expired after {self.timeout_s:.0f} s, its "
                    "layer stream failed, or the sender restarted)")
        out = torch.empty(shape, dtype=dtype, device=wire)
        for l0, l1 in spans:
            channel.recv(header, deadline)
            status, start = header.tolist()
            if start != l0:
                raise KVTransferLost(f"KV channel out of step: got layer {start}, wanted {l0}")
            if status != OK:
                return "ended by its sender: the prefill failed or was aborted mid-stream"
            channel.recv(out[l0:l1], deadline)
            self.bytes_received += out[l0:l1].numel() * out.element_size()
        if out.is_cuda:
            torch.cuda.current_stream(out.device).synchronize()  # any stream may read it now
        return out.to(device)

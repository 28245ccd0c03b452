"""The receiving end of the KV channels (a decode replica): one PairChannel per sender, made when
the first transfer from that sender arrives and kept for the next ones.

Pairing: connect to the sender's store, push a fresh pair id onto its `pairs` queue, and build
rank 1 of the pair's group (the sender's listener builds rank 0). A fetch pushes the transfer
id onto the pair's queue and receives the header, then the layer spans into one buffer. Fetches
on one pair go one at a time (a lock), as the bytes share one link anyway; fetches from
different senders run in parallel. A channel that breaks is dropped and its fetch raises
KVTransferLost; the next transfer from that sender pairs again.
"""

from __future__ import annotations

import threading
import time
import uuid

import torch

from kvtransfer.pair_channel import OK, ChannelAddress, PairChannel, connect_store
from kvtransfer.transport import KVTransferLost

STOP = "stop"


class _Pair:
    def __init__(self) -> None:
        self.lock = threading.Lock()  # one fetch at a time; held while pairing, too
        self.channel: PairChannel | None = None


class ChannelReceiver:
    def __init__(self, backend: str, host: str, timeout_s: float) -> None:
        self.backend, self.host, self.timeout_s = backend, host, timeout_s  # host: this node
        self._lock = threading.Lock()
        self._pairs: dict[ChannelAddress, _Pair] = {}
        self.bytes_received = 0  # counted per span, as it lands

    def fetch(self, addr: ChannelAddress, tid: int, shape: tuple[int, ...], dtype: torch.dtype,
              spans: list[tuple[int, int]], device: torch.device) -> torch.Tensor:
        """Transfer `tid` from the sender at `addr`, as a tensor of `shape` on `device`."""
        deadline = time.monotonic() + self.timeout_s
        with self._lock:
            pair = self._pairs.setdefault(addr, _Pair())
        with pair.lock:
            try:
                if pair.channel is None:
                    pair.channel = self._connect(addr)
                out = self._fetch(pair.channel, tid, shape, dtype, spans, device, deadline)
            except KVTransferLost:
                if pair.channel is not None:
                    pair.channel.close()  # broken mid-transfer: pair afresh next time
                    pair.channel = None
                raise
        if isinstance(out, str):  # the channel is fine; the payload is not there
            raise KVTransferLost(f"KV of transfer {tid} {out}")
        return out

    def close(self) -> None:
        with self._lock:
            pairs, self._pairs = list(self._pairs.values()), {}
        for pair in pairs:
            with pair.lock:
                if pair.channel is not None:
                    try:  # ends the sender's pair thread; it may be gone already
                        pair.channel.store.queue_push(pair.channel.fetch_key, STOP)
                    except Exception:
                        pass
                    pair.channel.close()
                    pair.channel = None

    @property
    def num_channels(self) -> int:
        with self._lock:
            return sum(p.channel is not None for p in self._pairs.values())

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
        wire = device if self.backend == "nccl" else torch.device("cpu")
        header = torch.zeros(2, dtype=torch.int64, device=wire)
        channel.recv(header, deadline)
        status, echoed = header.tolist()
        if echoed != tid:
            raise KVTransferLost(f"KV channel out of step: got transfer {echoed}, asked {tid}")
        if status != OK:
            return (f"not held by its sender (expired after {self.timeout_s:.0f} s, or the "
                    "sender restarted)")
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

"""The sending end of the KV channels (a prefill replica): hosts the rendezvous store, pairs with
each receiver that asks, and sends offered payloads when their receiver fetches them.

Threads (daemons; `close` ends them):
- the listener pops pair requests from the store's `pairs` queue and starts a pair thread;
- a pair thread builds its end of the PairChannel, then serves that receiver's fetches in order;
- the sweeper drops payloads nobody fetched within `timeout_s`, and layer streams whose
  prefill failed or was aborted at once (about a second).
A pair whose channel breaks (the receiver died mid-transfer) ends; the transfer it was sending
is dropped, since its receiver is gone. Offered payloads are held in host or device memory (the
pool pages were released at export), at most `timeout_s` each.
"""

from __future__ import annotations

import datetime
import itertools
import logging
import threading
import time
import uuid
from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine.kv_stream import KVStreamFailed, LayerwiseExport
from kvtransfer.pair_channel import (
    FAILED,
    MISSING,
    OK,
    STOP,
    ChannelAddress,
    PairChannel,
    wire_device,
)

log = logging.getLogger(__name__)
IDLE_WAIT = datetime.timedelta(days=1)  # store pops block this long between wake-ups


@dataclass
class _Offer:
    data: torch.Tensor | LayerwiseExport  # contiguous rows of layers, or layers as computed
    spans: list[tuple[int, int]]
    ready: torch.cuda.Event | None  # recorded after the data was produced (CUDA only)
    deadline: float  # time.monotonic()


class ChannelSender:
    def __init__(self, backend: str, host: str, timeout_s: float) -> None:
        self.backend, self.host, self.timeout_s = backend, host, timeout_s
        self.store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False,
                                   timeout=IDLE_WAIT)
        self.address = ChannelAddress(host, self.store.port, uuid.uuid4().hex)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._offers: dict[int, _Offer] = {}
        self._pairs: set[str] = set()  # pair ids, from the request until the pair ends
        self._closed = threading.Event()
        self.transfers_sent = self.transfers_dropped = 0
        self._threads = [threading.Thread(target=self._listen, name="kv-listen", daemon=True),
                         threading.Thread(target=self._sweep, name="kv-sweep", daemon=True)]
        for t in self._threads:
            t.start()

    # -- what the transport calls ---------------------------------------------------------
    def offer(self, data: torch.Tensor | LayerwiseExport, spans: list[tuple[int, int]]) -> int:
        """Hold `data` for its receiver; returns the transfer id to fetch it by. A
        LayerwiseExport's spans are sent as its layers are published (a fetch may come first)."""
        ready = None
        if isinstance(data, torch.Tensor) and data.is_cuda:
            # pair threads run on other streams: order them after the gather
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(data.device))
        with self._lock:
            tid = next(self._ids)
            self._offers[tid] = _Offer(data, spans, ready, time.monotonic() + self.timeout_s)
        return tid

    def withdraw(self, tid: int) -> bool:
        """Drop an offer no receiver will fetch (its handle never left this replica); False if
        it is not held (fetched, or dropped at its deadline)."""
        with self._lock:
            offer = self._offers.pop(tid, None)
            if offer is not None:
                self.transfers_dropped += 1
        return offer is not None

    @property
    def num_offers(self) -> int:
        with self._lock:
            return len(self._offers)

    @property
    def num_pairs(self) -> int:
        with self._lock:
            return len(self._pairs)

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        with self._lock:
            pair_ids = list(self._pairs)
            self._offers.clear()
        self.store.queue_push("pairs", STOP)
        for pair_id in pair_ids:
            self.store.queue_push(f"pair/{pair_id}/fetch", STOP)
        # Their groups shut down in their own threads, before the process may exit (a group
        # torn down by the interpreter's exit aborts it: "terminate called ...").
        end = time.monotonic() + 5.0
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=max(0.0, end - time.monotonic()))
        # The store's server lives as long as this, its master end: a receiver that comes
        # now is refused at once, as it would be by a dead replica.
        del self.store

    # -- threads ----------------------------------------------------------------------------
    def _listen(self) -> None:
        store = self.store.clone()
        while not self._closed.is_set():
            try:
                pair_id = store.queue_pop("pairs", block=True).decode()
            except dist.DistStoreError:  # an idle day
                continue
            except Exception:  # the store closed under us
                return
            if pair_id == STOP:
                return
            with self._lock:
                self._pairs.add(pair_id)
            thread = threading.Thread(target=self._serve_pair, args=(pair_id,),
                                      name=f"kv-pair-{pair_id}", daemon=True)
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
            thread.start()

    def _serve_pair(self, pair_id: str) -> None:
        try:
            channel = PairChannel(self.backend, self.store.clone(), pair_id, 0, self.host,
                                  self.timeout_s)
        except Exception as e:  # the receiver left before joining
            log.warning("KV pair %s never connected: %s", pair_id, e)
            self._end_pair(pair_id)
            return
        store = channel.store
        try:
            while not self._closed.is_set():
                try:
                    msg = store.queue_pop(channel.fetch_key, block=True).decode()
                except dist.DistStoreError:
                    continue
                if msg == STOP:
                    return
                self._send(channel, int(msg))
        except Exception as e:  # the receiver died or its channel broke mid-transfer
            if not self._closed.is_set():
                log.warning("KV pair %s closed: %s", pair_id, e)
        finally:
            channel.close()
            self._end_pair(pair_id)

    def _send(self, channel: PairChannel, tid: int) -> None:
        with self._lock:
            offer = self._offers.pop(tid, None)
        dev = wire_device(self.backend)
        deadline = time.monotonic() + self.timeout_s
        channel.send(_status(OK if offer else MISSING, tid, dev), deadline)
        if offer is None:
            return  # expired or unknown: the receiver raises KVTransferLost
        if offer.ready is not None:
            offer.ready.synchronize()
        for l0, l1 in offer.spans:
            data = offer.data
            if isinstance(data, LayerwiseExport):
                try:  # the prefill step is still running: wait for its layers < l1
                    stream, data = data, data.wait_allocated(deadline)
                    stream.wait(l1, deadline)
                except KVStreamFailed as e:  # aborted or failed: nothing more will come
                    log.info("KV stream of transfer %d ended: %s", tid, e)
                    channel.send(_status(FAILED, l0, dev), deadline)
                    return
            channel.send(_status(OK, l0, dev), deadline)
            channel.send(data[l0:l1], deadline)
        self.transfers_sent += 1

    def _sweep(self) -> None:
        period = min(1.0, self.timeout_s / 4)
        while not self._closed.wait(period):
            now = time.monotonic()
            with self._lock:
                expired = [tid for tid, o in self._offers.items() if o.deadline < now]
                # A layer stream whose prefill was aborted or failed will never be whole: its
                # buffer goes now, not at its deadline (a fetch then finds it missing, which
                # its receiver takes as lost, as it would the failure).
                failed = [tid for tid, o in self._offers.items() if o.deadline >= now
                          and isinstance(o.data, LayerwiseExport) and o.data.failed]
                for tid in expired + failed:
                    del self._offers[tid]
                self.transfers_dropped += len(expired) + len(failed)
            if expired:
                log.warning("dropped %d KV payload(s) never fetched within %.0f s",
                            len(expired), self.timeout_s)
            if failed:
                log.info("dropped %d KV stream(s) whose prefill ended without its KV",
                         len(failed))

    def _end_pair(self, pair_id: str) -> None:
        with self._lock:
            self._pairs.discard(pair_id)


def _status(status: int, value: int, device: torch.device) -> torch.Tensor:
    return torch.tensor([status, value], dtype=torch.int64, device=device)


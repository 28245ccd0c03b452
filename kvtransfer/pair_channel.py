"""One point-to-point KV channel between a sender (rank 0, a prefill replica) and a receiver
(rank 1, a decode replica): a 2-rank torch process group, NCCL between GPUs or gloo on CPU, built
once per pair from the TCP store that the sender hosts.

Only bytes cross the group, and only while a fetch is in progress: which transfer to send is
asked through the store (kvtransfer/channel_sender.py), so no group operation ever waits on an
idle peer (NCCL's watchdog tears the process down when one waits past its timeout).

Wire format of one fetch, sender to receiver: an int64 header `[status, transfer_id]`; if the
status is OK, then per layer span in order an int64 `[status, l0]` and, if that is OK, the
contiguous slice `data[l0:l1]`, received straight into the same slice of the receiver's buffer.
A span status FAILED ends the transfer (the prefill was aborted while its layers streamed out);
the channel stays usable.
"""

from __future__ import annotations

import datetime
import socket
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kvtransfer.transport import KVTransferLost

OK, MISSING, FAILED = 1, 0, 2
BACKENDS = ("gloo", "nccl")
STOP = "stop"  # pushed to a store queue to end the thread that pops it


def wire_device(backend: str, device: torch.device | None = None) -> torch.device:
    """Where a channel's tensors live: NCCL moves CUDA tensors only (`device`, else the
    current one), gloo CPU tensors."""
    if backend != "nccl":
        return torch.device("cpu")
    return device if device is not None else torch.device("cuda", torch.cuda.current_device())


@dataclass(frozen=True)
class ChannelAddress:
    """Where a sender's store listens; `sender_id` tells a restarted sender from the old one."""

    host: str
    port: int
    sender_id: str


def connect_store(addr: ChannelAddress, timeout_s: float) -> dist.TCPStore:
    """A client of the sender's store; raises KVTransferLost when the sender is gone."""
    try:
        # A store client retries a refused connection until its timeout (the request's, up to
        # minutes): probe once first, so that a dead sender is known at once.
        socket.create_connection((addr.host, addr.port), timeout=min(timeout_s, 10.0)).close()
        return dist.TCPStore(addr.host, addr.port, is_master=False,
                             timeout=datetime.timedelta(seconds=timeout_s))
    except Exception as e:  # refused or timed out: the sender replica is not there
        raise KVTransferLost(f"KV sender at {addr.host}:{addr.port} unreachable: {e}") from e


class PairChannel:
    """The process group of one (sender, receiver) pair and timed point-to-point ops on it.

    `store` is this side's client of (or, on the sender, a clone of) the sender's store; the
    group's rendezvous keys live under `pair/<pair_id>/`; `host` is this side's node address.
    Construction blocks until the other side constructs its end (or `timeout_s` passes).
    """

    def __init__(self, backend: str, store: dist.Store, pair_id: str, rank: int, host: str,
                 timeout_s: float) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown channel backend {backend!r}; valid: {list(BACKENDS)}")
        self.backend, self.pair_id, self.rank, self.timeout_s = backend, pair_id, rank, timeout_s
        self.store = store
        self.fetch_key = f"pair/{pair_id}/fetch"  # the receiver's requests, a store queue
        timeout = datetime.timedelta(seconds=timeout_s)
        prefix = dist.PrefixStore(f"pair/{pair_id}/pg", store)
        if backend == "gloo":
            opts = dist.ProcessGroupGloo._Options()
            opts._timeout = timeout
            # Bind to this node's address as the cluster knows it (`host`), not to whatever the
            # hostname resolves to (on a multi-homed node that can be an unroutable interface).
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
            self.group = dist.ProcessGroupGloo(prefix, rank, 2, opts)
        else:
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self.group = dist.ProcessGroupNCCL(prefix, rank, 2, opts)

    @property
    def peer(self) -> int:
        return 1 - self.rank

    def send(self, t: torch.Tensor, deadline: float) -> None:
        self._wait(self.group.send([_bytes(t)], self.peer, 0), deadline)

    def recv(self, t: torch.Tensor, deadline: float) -> None:
        self._wait(self.group.recv([_bytes(t)], self.peer, 0), deadline)

    def close(self) -> None:
        try:
            if self.backend == "nccl":
                self.group.abort()  # a pending NCCL op would otherwise block the teardown
            else:
                self.group.shutdown()
        except Exception:  # already broken: nothing left to release
            pass

    def _wait(self, work: dist.Work, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise KVTransferLost(f"KV channel {self.pair_id}: transfer timed out")
        try:
            work.wait(datetime.timedelta(seconds=left))
        except Exception as e:  # peer closed, reset or timed out: the pair is unusable now
            raise KVTransferLost(f"KV channel {self.pair_id} broke: {e}") from e


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """`t` (contiguous) as a flat uint8 view: one wire dtype whatever the pool's (gloo has no
    float8), and the same memory, so a receive lands in place."""
    if not t.is_contiguous():
        raise ValueError("channel tensors must be contiguous")
    return t.reshape(-1).view(torch.uint8)

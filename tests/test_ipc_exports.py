"""The cuda_ipc sender holds shared pages at most `timeout_s`, even for a receiver that died
holding the handle: it drops the receiver's reference itself then, and a receiver refuses a
handle past its `accept_by` (a margin earlier), releasing nothing. A handle that never left the
sender is discarded there at once. On the GPU: tests/gpu/test_cuda_ipc.py."""

from __future__ import annotations

import asyncio
import pickle

import pytest
import torch

from kvtransfer import KVPayload, KVTransferLost, cuda_ipc
from kvtransfer.cuda_ipc import CudaIpcTransport, IpcPages
from kvtransfer.ipc_exports import IpcExports, refused


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def ledger(clock: Clock, released: list, timeout_s: float = 10.0) -> IpcExports:
    return IpcExports(timeout_s, clock=clock, release=lambda rc, dev: released.append((rc, dev)))


def test_exports_are_released_by_the_sender_at_their_timeout_in_order():
    clock, released = Clock(), []
    exports = ledger(clock, released)
    assert exports.add((b"/torch_1_2", 0), 0) == 109.0  # accept_by: 10% of 10 s before 110
    clock.now = 105.0
    assert exports.add((b"/torch_1_2", 1), 0) == 114.0
    clock.now = 109.99
    assert exports.expire() == 0 and released == [] and len(exports) == 2
    clock.now = 110.0
    assert exports.expire() == 1
    assert released == [((b"/torch_1_2", 0), 0)] and len(exports) == 1
    clock.now = 200.0
    assert exports.expire() == 1
    assert released == [((b"/torch_1_2", 0), 0), ((b"/torch_1_2", 1), 0)] and len(exports) == 0


def test_a_release_that_fails_is_logged_and_forgotten_never_raised(caplog):
    clock = Clock()

    def fails(ref_counter, device):
        raise RuntimeError("unable to open shared memory object")

    exports = IpcExports(10.0, clock=clock, release=fails)
    exports.add((b"/torch_1_2", 0), 0)
    clock.now = 111.0
    assert exports.expire() == 1 and len(exports) == 0
    assert "could not drop a cuda_ipc export's reference" in caplog.text


def test_the_margin_is_a_fraction_of_the_timeout():
    with pytest.raises(ValueError, match="margin"):
        IpcExports(10.0, margin=1.0)
    assert IpcExports(600.0, clock=lambda: 0.0).add((b"f", 0), 0) == 540.0


def _handle(accept_by: float) -> bytes:
    header = KVPayload.from_tensor(torch.zeros(2, 1, 2, 4, 1, 8), 4, 0, [7], "fp").header()
    pages = IpcPages(0, bytes(64), 0, 512, (b"/torch_1_2", 3), None, accept_by)
    return pickle.dumps((header, pages))


def test_a_receiver_refuses_a_late_handle_and_releases_nothing(monkeypatch):
    released = []
    monkeypatch.setattr(cuda_ipc, "_release_sender", lambda pages, device: released.append(pages))
    clock = Clock()
    transport = CudaIpcTransport(timeout_s=10.0, clock=clock)
    clock.now = 109.0
    header, pages = transport._accept(_handle(accept_by=109.0))  # on time: taken
    assert pages.ref_counter == (b"/torch_1_2", 3) and header.block_hashes == [7]
    clock.now = 109.5
    with pytest.raises(KVTransferLost, match="0.5 s past its accept_by"):
        transport.take(_handle(accept_by=109.0), torch.device("cuda", 0))
    assert released == []  # the sender drops that reference at its release_at
    assert refused(109.0, clock) and not refused(109.5, clock)


def test_a_discarded_handle_drops_its_reference_at_once_and_only_once():
    clock, released = Clock(), []
    transport = CudaIpcTransport(timeout_s=10.0, clock=clock)
    transport.exports = ledger(clock, released)
    transport.exports.add((b"/torch_1_2", 3), 0)  # as export_pages does for _handle's pages
    transport.exports.add((b"/torch_1_2", 4), 0)
    transport.discard(_handle(accept_by=109.0))
    assert released == [((b"/torch_1_2", 3), 0)] and len(transport.exports) == 1
    transport.discard(_handle(accept_by=109.0))  # not held any more: nothing is released
    clock.now = 200.0
    assert transport.exports.expire() == 1  # the other export, at its time
    assert released == [((b"/torch_1_2", 3), 0), ((b"/torch_1_2", 4), 0)]


def test_a_receiver_releases_an_unused_handle_without_a_copy(monkeypatch):
    """A receiver that will not read a handle's KV (its request ended) gives the reference
    back at once, mapping and copying nothing; past `accept_by` it leaves that to the sender."""
    released = []
    monkeypatch.setattr(cuda_ipc, "_release_sender", lambda pages, device: released.append(
        (pages.ref_counter, str(device))))
    monkeypatch.setattr(cuda_ipc, "cuda_runtime", lambda: pytest.fail("nothing is mapped"))
    clock = Clock()
    transport = CudaIpcTransport(timeout_s=10.0, clock=clock)
    clock.now = 109.0
    asyncio.run(transport.release(_handle(accept_by=109.0), "cuda:0"))
    assert released == [((b"/torch_1_2", 3), "cuda:0")]
    clock.now = 109.5
    asyncio.run(transport.release(_handle(accept_by=109.0), "cuda:0"))
    assert released == [((b"/torch_1_2", 3), "cuda:0")]  # late: the sender drops it itself

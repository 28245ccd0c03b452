"""cuda_ipc transport: pages gathered in one process arrive intact in another (same GPU), the
mapping is gone once `receive` returns, and the sender gets its block back: from the receiver,
or, when no receiver released it, from its own ledger once `timeout_s` has passed."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _sender(queue, done) -> None:
    from kvtransfer.cuda_ipc import CudaIpcTransport
    from kvtransfer.payload import KVPayload

    torch.manual_seed(0)
    pages = torch.randn(2, 3, 2, 16, 8, 128, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    own = torch.cuda.memory_allocated()  # `pages` only
    payload = KVPayload.from_tensor(pages[:, 1:], 16, 1, [7, 8], "fp")  # a copy: sent
    now = [time.monotonic()]  # the receiver's clock, until the end
    transport = CudaIpcTransport(clock=lambda: now[0])
    queue.put((transport.send(payload), pages[:, 1:].float().sum().item()))
    del payload  # torch holds the sent block until the receiver releases it
    done.wait(60)  # the receiver's copy is done
    torch.cuda.ipc_collect()
    released = torch.cuda.memory_allocated()
    # Past timeout_s the sender drops the reference itself, not knowing the receiver did: a
    # second release of a freed block's counter must change nothing.
    now[0] += transport.timeout_s
    transport.send(KVPayload.from_tensor(pages[:, :0], 16, 0, [], "fp"))
    queue.put((own, released, torch.cuda.memory_allocated(), len(transport.exports)))


def test_pages_cross_processes_on_device():
    from kvtransfer.cuda_ipc import CudaIpcTransport

    ctx = mp.get_context("spawn")
    queue, done = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_sender, args=(queue, done))
    proc.start()
    try:
        handle, expected = queue.get(timeout=120)
        torch.cuda.init()
        before = torch.cuda.memory_allocated()
        transport = CudaIpcTransport()
        payload = asyncio.run(transport.receive(handle, "cuda"))
        data = payload.data
        # A copy of this process's own; the sender's memory is no longer in use here (its
        # mapping lingers for the next payloads: kvtransfer/cuda_runtime.py).
        assert torch.cuda.memory_allocated() - before == data.nbytes
        assert transport.mappings.in_use() == 0
        assert data.is_cuda and data.dtype == torch.bfloat16
        assert tuple(data.shape) == (2, 2, 2, 16, 8, 128)
        copy = data.clone()
        torch.cuda.synchronize()
        assert copy.float().sum().item() == pytest.approx(expected, rel=1e-6)
        assert payload.block_hashes == [7, 8] and payload.first_block == 1
        del data, payload
    finally:
        done.set()
    own, after, after_expiry, held = queue.get(timeout=60)
    proc.join(60)
    assert proc.exitcode == 0
    assert after == own  # the receiver released torch's reference: the sent block is free
    assert after_expiry == own and held == 0


def _send_one(transport) -> tuple[bytes, int, int]:
    """Sends one payload of fresh pages (the caller keeps no reference to them); returns the
    handle, the memory allocated before, and the pages' bytes."""
    from kvtransfer.payload import KVPayload

    torch.cuda.synchronize()
    torch.cuda.ipc_collect()
    base = torch.cuda.memory_allocated()
    data = torch.randn(2, 4, 2, 16, 8, 128, device="cuda", dtype=torch.bfloat16)
    return transport.send(KVPayload.from_tensor(data, 16, 0, [], "fp")), base, data.nbytes


def _send_nothing(transport) -> None:
    """A send of no pages: its `ipc_collect` frees the blocks no receiver holds any more."""
    from kvtransfer.payload import KVPayload

    transport.send(KVPayload.from_tensor(torch.empty(2, 0, 2, 16, 8, 128, device="cuda",
                                                     dtype=torch.bfloat16), 16, 0, [], "fp"))


def test_the_sender_frees_pages_whose_receiver_never_released_them():
    """A decode replica that died holding a handle: the sender's first send after `timeout_s`
    drops the reference, and torch frees the block; the handle is refused from `accept_by` on."""
    from kvtransfer import KVTransferLost
    from kvtransfer.cuda_ipc import CudaIpcTransport

    now = [1000.0]
    transport = CudaIpcTransport(timeout_s=10.0, clock=lambda: now[0])
    handle, base, nbytes = _send_one(transport)
    now[0] = 1009.5
    _send_nothing(transport)  # expires nothing yet
    assert torch.cuda.memory_allocated() - base == nbytes  # held for its receiver
    assert len(transport.exports) == 1
    with pytest.raises(KVTransferLost, match="past its accept_by"):
        asyncio.run(transport.receive(handle, "cuda"))  # accept_by was 1009.0
    now[0] = 1010.0
    _send_nothing(transport)
    assert torch.cuda.memory_allocated() == base
    assert len(transport.exports) == 0


def test_a_discarded_handle_frees_the_sent_pages_at_the_next_send():
    """A handle that never left the sender (its prefill's caller left during `send`): `discard`
    drops the receiver's reference, and torch frees the block at the next `ipc_collect` (the
    next send's), long before `timeout_s`."""
    from kvtransfer.cuda_ipc import CudaIpcTransport

    transport = CudaIpcTransport(timeout_s=600.0)
    handle, base, nbytes = _send_one(transport)
    assert torch.cuda.memory_allocated() - base == nbytes  # held for a receiver
    transport.discard(handle)
    assert len(transport.exports) == 0
    _send_nothing(transport)
    assert torch.cuda.memory_allocated() == base


def test_a_released_handle_frees_the_sent_pages_without_a_copy():
    """A receiver that will not read the KV (its request ended) releases the handle: nothing is
    allocated on its side, and the sender frees the block at its next send's `ipc_collect`."""
    from kvtransfer.cuda_ipc import CudaIpcTransport

    transport = CudaIpcTransport(timeout_s=600.0)
    handle, base, nbytes = _send_one(transport)
    assert torch.cuda.memory_allocated() - base == nbytes
    asyncio.run(transport.release(handle, "cuda"))
    assert torch.cuda.memory_allocated() - base == nbytes  # no copy was made
    _send_nothing(transport)
    assert torch.cuda.memory_allocated() == base


def test_a_payload_without_pages_needs_no_handle():
    from kvtransfer.cuda_ipc import CudaIpcTransport
    from kvtransfer.payload import KVPayload

    transport = CudaIpcTransport()
    empty = torch.empty(2, 0, 2, 16, 8, 128, device="cuda", dtype=torch.bfloat16)
    blob = transport.send(KVPayload.from_tensor(empty, 16, 3, [1, 2, 3], "fp"))
    payload = asyncio.run(transport.receive(blob, "cuda"))
    assert payload.data.is_cuda and tuple(payload.data.shape) == (2, 0, 2, 16, 8, 128)
    assert payload.data.dtype == torch.bfloat16 and payload.first_block == 3

"""cuda_ipc transport: pages gathered in one process arrive intact in another (same GPU), the
mapping is gone once `receive` returns, and the sender gets its block back."""

from __future__ import annotations

import asyncio
import multiprocessing as mp

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
    queue.put((CudaIpcTransport().send(payload), pages[:, 1:].float().sum().item()))
    del payload  # torch holds the sent block until the receiver releases it
    done.wait(60)  # the receiver's copy is done
    torch.cuda.ipc_collect()
    queue.put((own, torch.cuda.memory_allocated()))


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
        # A copy of this process's own, and the sender's memory no longer mapped: unmapping
        # where the engine steps would wait for the GPU.
        assert torch.cuda.memory_allocated() - before == data.nbytes
        assert len(transport.mappings) == 0
        assert data.is_cuda and data.dtype == torch.bfloat16
        assert tuple(data.shape) == (2, 2, 2, 16, 8, 128)
        copy = data.clone()
        torch.cuda.synchronize()
        assert copy.float().sum().item() == pytest.approx(expected, rel=1e-6)
        assert payload.block_hashes == [7, 8] and payload.first_block == 1
        del data, payload
    finally:
        done.set()
    own, after = queue.get(timeout=60)
    proc.join(60)
    assert proc.exitcode == 0
    assert after == own  # the receiver released torch's reference: the sent block is free


def test_a_payload_without_pages_needs_no_handle():
    from kvtransfer.cuda_ipc import CudaIpcTransport
    from kvtransfer.payload import KVPayload

    transport = CudaIpcTransport()
    empty = torch.empty(2, 0, 2, 16, 8, 128, device="cuda", dtype=torch.bfloat16)
    blob = transport.send(KVPayload.from_tensor(empty, 16, 3, [1, 2, 3], "fp"))
    payload = asyncio.run(transport.receive(blob, "cuda"))
    assert payload.data.is_cuda and tuple(payload.data.shape) == (2, 0, 2, 16, 8, 128)
    assert payload.data.dtype == torch.bfloat16 and payload.first_block == 3

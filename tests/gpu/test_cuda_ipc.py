"""cuda_ipc transport: pages gathered in one process arrive intact in another (same GPU)."""

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
    payload = KVPayload.from_tensor(pages[:, 1:], 16, 1, [7, 8], "fp")
    queue.put((CudaIpcTransport().send(payload), pages[:, 1:].float().sum().item()))
    done.wait(60)  # the sender must outlive the receiver's copy


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
        payload = asyncio.run(CudaIpcTransport().receive(handle, "cuda"))
        data = payload.data
        # A copy of this process's own, not the mapped sender memory: the mapping is released
        # in the receive (releasing it where the engine steps would wait for the GPU).
        assert torch.cuda.memory_allocated() - before == data.nbytes
        assert data.is_cuda and data.dtype == torch.bfloat16
        assert tuple(data.shape) == (2, 2, 2, 16, 8, 128)
        copy = data.clone()
        torch.cuda.synchronize()
        assert copy.float().sum().item() == pytest.approx(expected, rel=1e-6)
        assert payload.block_hashes == [7, 8] and payload.first_block == 1
        del data, payload
    finally:
        done.set()
        proc.join(60)
    assert proc.exitcode == 0

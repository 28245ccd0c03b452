"""`KVTransport.receive_into`: a transport that cannot write into the pool returns its payload
for the engine to write; one that writes there itself never lets a cancelled caller go (and
free the pages) while its write may still run. GPU behaviour: tests/gpu/test_page_import.py."""

from __future__ import annotations

import asyncio
import threading

import torch

from engine.page_import import PageImport
from kvtransfer import KVPayload, make_transport
from kvtransfer.cuda_ipc import _to_thread_to_the_end


def test_a_transport_without_pool_writes_hands_the_payload_over():
    transport = make_transport("inline")
    data = torch.arange(2 * 3 * 2 * 4 * 1 * 2, dtype=torch.float32).view(2, 3, 2, 4, 1, 2)
    handle = transport.send(KVPayload.from_tensor(data, 4, 0, [], "fp"))
    target = PageImport(torch.device("cpu"), tuple(data.shape), torch.float32, (5, 6, 7), 0,
                        0, 0, None)
    got = asyncio.run(transport.receive_into(handle, target))
    assert not got.data.is_meta and torch.equal(got.data, data)


def test_a_cancelled_receive_ends_only_after_its_write():
    release, wrote = threading.Event(), []

    def write() -> str:
        release.wait(10)
        wrote.append("pages")
        return "header"

    async def main():
        task = asyncio.ensure_future(_to_thread_to_the_end(write))
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.sleep(0.05)
        running_after_cancel = not task.done()  # still waiting for the write
        task.cancel()  # a second cancellation does not let it go either
        await asyncio.sleep(0.05)
        running_after_second = not task.done()
        release.set()
        try:
            await task
        except asyncio.CancelledError:
            return running_after_cancel, running_after_second, "cancelled"
        return running_after_cancel, running_after_second, "returned"

    assert asyncio.run(main()) == (True, True, "cancelled")
    assert wrote == ["pages"]


def test_an_uncancelled_receive_returns_the_writers_result():
    assert asyncio.run(_to_thread_to_the_end(lambda: "header")) == "header"

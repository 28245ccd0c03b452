"""`KVTransport.receive_into`: a transport that cannot write into the pool returns its payload
for the engine to write; one that writes there itself never lets a cancelled caller go (and
free the pages) while its write may still run, and the engine keeps a reservation whose pages
a transport may be writing until `end_import`, whatever aborts it meanwhile. GPU behaviour:
tests/gpu/test_page_import.py."""

from __future__ import annotations

import asyncio
import threading

import torch

from engine import llm_engine
from engine.config import EngineConfig, ModelConfig
from engine.llm_engine import Engine
from engine.page_import import PageImport
from engine.sampling_params import SamplingParams
from kvtransfer import KVPayload, make_transport
from kvtransfer.cuda_ipc import CudaIpcTransport, _to_thread_to_the_end

GREEDY = SamplingParams(max_tokens=4, temperature=0.0)


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


def test_cuda_ipc_imports_into_the_pool_are_not_held_to_the_copy_bound(monkeypatch):
    """`max_concurrent` bounds the receives that copy into memory of their own; writes into
    reserved pool pages need none, so a prefill step's many prompts are imported at once."""
    transport = CudaIpcTransport(max_concurrent=2)
    together = threading.Barrier(8, timeout=60)

    def write_into(handle: bytes, target: object) -> bytes:
        together.wait()  # broken (an error) unless all eight writes run at once
        return handle

    monkeypatch.setattr(transport, "write_into", write_into)

    async def main():
        return await asyncio.gather(*[transport.receive_into(bytes([i]), None)
                                      for i in range(8)])

    try:
        assert asyncio.run(main()) == [bytes([i]) for i in range(8)]
    finally:
        transport.close()


def _engine(path: str, monkeypatch) -> Engine:
    """A CPU engine that hands out a PageImport as a GPU pool does (the lease is what is
    tested; no transport writes here)."""
    monkeypatch.setattr(llm_engine, "page_import", lambda pool, pages: ("lease", tuple(pages)))
    return Engine(ModelConfig(path), EngineConfig(page_size=16, num_pages=8))


def test_an_abort_during_an_import_frees_the_pages_only_when_it_ends(tiny_llama, monkeypatch):
    engine = _engine(tiny_llama, monkeypatch)
    prompt = list(range(100, 140))  # 3 pages
    rsv = engine.reserve("a", prompt, GREEDY)
    assert rsv.import_to == ("lease", (0, 1, 2))
    assert engine.abort("a")  # the client left while the KV was on the way
    assert engine.stats().pages_used == 3  # a transport may still write them: kept
    engine.check_integrity()
    big = list(range(200, 290))  # 6 pages: only 5 of the 8 are free while "a" is written
    assert engine.reserve("b", big, GREEDY) is None
    engine.end_import("a")  # the receive ended
    assert engine.stats().pages_used == 0 and engine.importing == {}
    engine.check_integrity()
    assert engine.reserve("b", big, GREEDY) is not None  # a's pages are free only now


def test_an_import_that_ends_first_leaves_aborts_as_they_were(tiny_llama, monkeypatch):
    engine = _engine(tiny_llama, monkeypatch)
    engine.reserve("a", list(range(100, 140)), GREEDY)
    engine.end_import("a")
    assert engine.stats().pages_used == 3  # still reserved: no abort came
    assert engine.abort("a")
    assert engine.stats().pages_used == 0
    engine.end_import("a")  # a second end, or one for a request gone: nothing happens
    engine.check_integrity()


"""Prefill and decode workers wired in one process (inline transport): tokens equal the
colocated engine's, and a shared prompt prefix crosses the wire only once."""

from __future__ import annotations

import asyncio

import pytest
import torch

from decode.worker import DecodeWorker
from engine import llm_engine
from engine.async_engine import AsyncEngine
from engine.config import EngineConfig, ModelConfig
from engine.llm import LLM
from engine.llm_engine import Engine
from engine.page_import import PageImport
from engine.sampling_params import SamplingParams
from kvtransfer import KVPayload, make_transport, model_fingerprint
from kvtransfer.inline import InlineTransport
from kvtransfer.transport import KVTransport
from prefill.worker import PrefillWorker

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def inline_pair(path: str, local_prefill_max_tokens: int = 0, transport: KVTransport | None = None,
                **engine_kwargs) -> tuple[PrefillWorker, DecodeWorker]:
    """A prefill and a decode worker in this process over the inline transport (or
    `transport`), each with its own engine (16-token pages, 128 of them, plus
    `engine_kwargs`)."""
    cfg = EngineConfig(page_size=16, num_pages=128, **engine_kwargs)
    fp = model_fingerprint(path, "float32", "safetensors", 0)
    transport = transport or make_transport("inline")
    prefill = PrefillWorker(AsyncEngine(Engine(ModelConfig(path), cfg)), transport, fp)
    decode = DecodeWorker(AsyncEngine(Engine(ModelConfig(path), cfg)), prefill, transport, fp,
                          local_prefill_max_tokens=local_prefill_max_tokens)
    return prefill, decode


def no_pages_left(*workers) -> None:
    """Each worker's engine passes its page audit and holds no page."""
    for worker in workers:
        worker.engine.engine.check_integrity()
        assert worker.engine.stats().pages_used == 0


async def _collect(decode: DecodeWorker, prompt, params, rid):
    return [out async for out in decode.generate(prompt, params, rid)]


async def leave_after_first_output(decode: DecodeWorker, prompt: list[int], rid: str) -> None:
    """A client that goes away after the first output of a long request. As Serve does then,
    the task waiting for the next output is cancelled inside the engine's stream, which aborts
    the request at once (closing the stream instead would leave the abort to the inner
    generators' finalizers, run whenever they are collected)."""
    long = SamplingParams(max_tokens=10_000, temperature=0.0, ignore_eos=True)
    first = asyncio.Event()

    async def client():
        async for _ in decode.generate(prompt, long, rid):
            first.set()

    task = asyncio.create_task(client())
    await first.wait()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def test_tokens_equal_colocated_and_prefix_pages_move_once(tiny_llama):
    async def main():
        prefill, decode = inline_pair(tiny_llama)
        shared = list(range(100, 164))  # 4 full blocks
        a, b = shared + [7, 8, 9], shared + [10, 11]
        outs_a = await _collect(decode, a, GREEDY, "a")
        bytes_a = decode.metrics.counters["pdserve_kv_transfer_bytes_total"]
        outs_b = await _collect(decode, b, GREEDY, "b")
        bytes_b = decode.metrics.counters["pdserve_kv_transfer_bytes_total"] - bytes_a
        return prefill, decode, outs_a, outs_b, bytes_a, bytes_b

    prefill, decode, outs_a, outs_b, bytes_a, bytes_b = asyncio.run(main())
    ref = LLM(tiny_llama, num_pages=128).generate([list(range(100, 164)) + [7, 8, 9],
                                                    list(range(100, 164)) + [10, 11]], GREEDY)
    assert [t for o in outs_a for t in o.new_token_ids] == ref[0].token_ids
    assert [t for o in outs_b for t in o.new_token_ids] == ref[1].token_ids
    assert "".join(o.new_text for o in outs_a) == ref[0].text
    page_bytes = bytes_a // 5  # prompt a: 67 tokens = 5 pages
    assert bytes_b == page_bytes  # b: 4 shared blocks cached on the decode side, 1 page moved
    assert decode.metrics.counters["pdserve_kv_transfer_blocks_skipped_total"] == 4
    assert decode.metrics.counters["pdserve_kv_transfer_seconds_total"] > 0  # two receives timed
    assert prefill.metrics.counters["pdserve_kv_transfer_bytes_sent_total"] == bytes_a + bytes_b
    no_pages_left(prefill, decode)


def test_the_transports_own_totals_reach_the_decode_replicas_metrics(tiny_llama):
    """A transport's `counters()` (cuda_ipc's: sender allocations mapped and unmapped) are in
    the receiving replica's metrics snapshots as they stand then, receives or not (cuda_ipc
    unmaps in a thread of its own, seconds after the last receive)."""
    class Counting(InlineTransport):
        sent = 0

        def send(self, payload: KVPayload) -> object:
            self.sent += 1
            return super().send(payload)

        def counters(self) -> dict[str, float]:
            return {"pdserve_kv_transfer_maps_total": self.sent}

    async def main():
        prefill, decode = inline_pair(tiny_llama, transport=Counting())
        await _collect(decode, list(range(300, 340)), GREEDY, "a")
        await _collect(decode, list(range(400, 440)), GREEDY, "b")
        return decode

    decode = asyncio.run(main())
    assert decode.metrics.snapshot()["counters"]["pdserve_kv_transfer_maps_total"] == 2
    decode.transport.sent = 5  # totals that move with no receive
    assert decode.metrics.snapshot()["counters"]["pdserve_kv_transfer_maps_total"] == 5


def test_a_prompt_cached_whole_on_the_decode_side_moves_no_pages(tiny_llama):
    """A prompt of full blocks only, all cached where it decodes (a repeat, or a resume after a
    replica died): the prefill replica exports no page, and the tokens stay right."""
    async def main():
        prefill, decode = inline_pair(tiny_llama)
        prompt = list(range(200, 264))  # exactly 4 full blocks
        first = await _collect(decode, prompt, GREEDY, "first")
        moved = decode.metrics.counters["pdserve_kv_transfer_bytes_total"]
        again = await _collect(decode, prompt, GREEDY, "again")
        return prefill, decode, prompt, first, again, moved

    prefill, decode, prompt, first, again, moved = asyncio.run(main())
    ref = LLM(tiny_llama, num_pages=128).generate([prompt], GREEDY)[0].token_ids
    assert [t for o in first for t in o.new_token_ids] == ref
    assert [t for o in again for t in o.new_token_ids] == ref
    assert decode.metrics.counters["pdserve_kv_transfer_bytes_total"] == moved  # nothing more
    assert decode.metrics.counters["pdserve_kv_transfer_blocks_skipped_total"] == 4
    no_pages_left(prefill, decode)


def test_concurrent_requests_and_abort_free_pages(tiny_llama):
    async def main():
        prefill, decode = inline_pair(tiny_llama)
        prompts = [[5 + i] * (10 + 7 * i) for i in range(6)]
        results = await asyncio.gather(*[_collect(decode, p, GREEDY, f"r{i}")
                                         for i, p in enumerate(prompts)])
        await leave_after_first_output(decode, [3] * 20, "gone")
        for worker in (prefill, decode):  # the audit queues behind the abort: it ran by then
            await worker.engine.check_integrity()
        return prefill, decode, prompts, results

    prefill, decode, prompts, results = asyncio.run(main())
    ref = LLM(tiny_llama, num_pages=128).generate(prompts, GREEDY)
    assert [[t for o in r for t in o.new_token_ids] for r in results] == \
        [o.token_ids for o in ref]
    no_pages_left(prefill, decode)


def test_payload_mismatch_is_rejected(tiny_llama):
    import torch

    p = KVPayload.from_tensor(torch.zeros(4, 1, 2, 16, 2, 32), 16, 0, [1], "abc")
    kw = dict(dtype=torch.float32, page_size=16, first_block=0, block_hashes=[1], num_pages=1)
    p.check(fingerprint="abc", **kw)
    with pytest.raises(ValueError, match="fingerprint"):
        p.check(fingerprint="xyz", **kw)
    with pytest.raises(ValueError, match="dtype"):
        p.check(fingerprint="abc", **{**kw, "dtype": torch.bfloat16})
    with pytest.raises(ValueError, match="2 pages sent, 1 expected"):
        KVPayload.from_tensor(torch.zeros(4, 2, 2, 16, 2, 32), 16, 0, [1], "abc").header() \
            .check(fingerprint="abc", **kw)


def test_the_decode_worker_ends_every_import_it_was_given(tiny_llama, monkeypatch):
    """With a PageImport on every reservation (as on a GPU) and a transport that hands the
    payload over (the default `receive_into`), tokens are the colocated engine's and no import
    lease (engine/page_import.py) is left behind, after a success and after a refused payload
    alike."""
    target = PageImport(torch.device("cpu"), (), torch.float32, (), 0, 0, 0, None)
    monkeypatch.setattr(llm_engine, "page_import", lambda pool, pages: target)
    prompt = list(range(100, 140))

    async def main():
        prefill, decode = inline_pair(tiny_llama)
        got = await _collect(decode, prompt, GREEDY, "ok")
        wrong = DecodeWorker(decode.engine, prefill, decode.transport, "another model")
        with pytest.raises(ValueError):
            await _collect(wrong, prompt, GREEDY, "refused")
        await decode.engine.check_integrity()
        return decode, got

    decode, got = asyncio.run(main())
    ref = LLM(tiny_llama, num_pages=128).generate([prompt], GREEDY)[0].token_ids
    assert [t for o in got for t in o.new_token_ids] == ref
    assert decode.engine.engine.importing == {}
    assert decode.engine.stats().pages_used == 0


def test_a_prefill_whose_caller_leaves_while_its_kv_is_sent_discards_the_handle(tiny_llama):
    """The send runs in a thread, which the caller's cancellation does not stop: the handle it
    makes reaches nobody, so the transport discards it at once (with `cuda_ipc`, else GPU
    memory of the prefill replica held for `timeout_s`)."""
    import threading

    from kvtransfer.inline import InlineTransport

    class HeldSend(InlineTransport):
        def __init__(self) -> None:
            super().__init__()
            self.sending, self.go = threading.Event(), threading.Event()
            self.sent: list[object] = []
            self.discarded: list[object] = []

        def send(self, payload: KVPayload) -> object:
            self.sending.set()
            self.go.wait(60)  # a hang guard, not a speed bound
            self.sent.append(payload)
            return payload

        def discard(self, handle: object) -> None:
            self.discarded.append(handle)

    transport = HeldSend()
    fp = model_fingerprint(tiny_llama, "float32", "safetensors", 0)
    prefill = PrefillWorker(AsyncEngine(Engine(ModelConfig(tiny_llama), EngineConfig(
        page_size=16, num_pages=32))), transport, fp)

    async def main():
        call = asyncio.ensure_future(prefill.prefill(list(range(5, 40)), GREEDY, "gone"))
        await asyncio.to_thread(transport.sending.wait, 60)
        call.cancel()  # the caller leaves while the KV is being sent
        await asyncio.gather(call, return_exceptions=True)
        assert call.cancelled() and transport.discarded == []  # the send is still running
        transport.go.set()
        for _ in range(6000):  # a hang guard, not a speed bound
            if transport.discarded:
                break
            await asyncio.sleep(0.01)
        kept = await prefill.prefill(list(range(5, 40)), GREEDY, "kept")  # answered: kept
        return kept

    kept = asyncio.run(main())
    assert len(transport.sent) == 2 and transport.discarded == [transport.sent[0]]
    assert kept.kv is transport.sent[1]
    no_pages_left(prefill)

"""The decode side under failures and pressure, prefill and decode workers wired in one process:
a lost prefill call is retried (on another replica) and the tokens stay right; a client gone
before its first token frees its decode pages and its prefill never runs; a decode pool too small
for the batch preempts and recomputes, giving the tokens of a roomy pool."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from decode.worker import DecodeWorker
from engine.async_engine import AsyncEngine
from engine.config import EngineConfig, ModelConfig
from engine.llm import LLM
from engine.llm_engine import Engine
from engine.sampling_params import SamplingParams
from kvtransfer import make_transport, model_fingerprint
from prefill.worker import PrefillWorker

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


class ReplicaLost(Exception):
    pass


class FlakyPrefill:
    """The first `failures` calls fail as a lost replica would; the rest reach `worker`."""

    def __init__(self, worker: PrefillWorker, failures: int) -> None:
        self.worker, self.failures, self.calls = worker, failures, 0

    async def prefill(self, *args):
        self.calls += 1
        if self.calls <= self.failures:
            raise ReplicaLost("prefill replica died")
        return await self.worker.prefill(*args)


def workers(path: str, decode_pages: int = 128, failures: int = 0):
    fp = model_fingerprint(path, "float32", "safetensors", 0)
    transport = make_transport("inline")
    # Overlap off whatever the device: the disconnect test spies on runner.execute, the path
    # of a step without overlap (with it, steps go through runner.launch).
    prefill = PrefillWorker(AsyncEngine(Engine(ModelConfig(path), EngineConfig(
        page_size=16, num_pages=128, overlap_scheduling="off"))), transport, fp)
    decode_cfg = EngineConfig(page_size=16, num_pages=decode_pages, enable_prefix_caching=False)
    decode = DecodeWorker(AsyncEngine(Engine(ModelConfig(path), decode_cfg)),
                          FlakyPrefill(prefill, failures), transport, fp, timeout_s=30,
                          retriable=lambda e: isinstance(e, ReplicaLost))
    return prefill, decode


async def tokens(decode: DecodeWorker, prompt: list[int], params: SamplingParams,
                 rid: str) -> list[int]:
    return [t async for out in decode.generate(prompt, params, rid) for t in out.new_token_ids]


async def drained(*ws) -> None:
    """Returns once every action queued on the workers' engines so far (aborts of cancelled
    requests among them) has run: the audit call queues behind them."""
    for w in ws:
        await w.engine.check_integrity()


def assert_clean(*ws) -> None:
    for w in ws:
        w.engine.engine.check_integrity()
        assert w.engine.stats().pages_used == 0


def test_lost_prefill_is_retried(tiny_llama):
    prompt = list(range(100, 140))

    async def main():
        prefill, decode = workers(tiny_llama, failures=2)
        got = await tokens(decode, prompt, GREEDY, "a")
        return prefill, decode, got

    prefill, decode, got = asyncio.run(main())
    assert got == LLM(tiny_llama, num_pages=64).generate(prompt, GREEDY)[0].token_ids
    assert decode.prefill.calls == 3
    assert decode.metrics.counters["pdserve_prefill_retries_total"] == 2
    assert_clean(prefill, decode)


def test_disconnect_before_first_token_cancels_prefill(tiny_llama):
    async def main():
        prefill, decode = workers(tiny_llama)
        eng = prefill.engine.engine
        ran: list[str] = []
        execute, step = eng.runner.execute, eng.step

        def spy(batch):
            ran.extend(r.request_id for r in batch.requests)
            return execute(batch)

        gate = threading.Event()

        def gated_step():
            gate.wait(timeout=60)  # holds "first" in its step until "gone" is gone
            return step()

        async def until(cond) -> None:
            for _ in range(6000):  # a hang guard, not a speed bound
                if cond():
                    return
                await asyncio.sleep(0.01)
            raise AssertionError("timed out")

        eng.runner.execute, eng.step = spy, gated_step
        first = asyncio.create_task(tokens(decode, [5] * 30, GREEDY, "first"))
        await until(lambda: "first" in eng.scheduler.requests)
        gone = asyncio.create_task(tokens(decode, [6] * 30, GREEDY, "gone"))
        # "gone" holds reserved decode pages and waits in the prefill queue.
        await until(lambda: "gone" in decode.engine.engine.scheduler.reserved
                    and prefill.engine.has_stream("gone"))
        gone.cancel()  # the client disconnects before its first token
        await asyncio.gather(gone, return_exceptions=True)
        gate.set()
        await first
        await drained(prefill, decode)
        return prefill, decode, ran

    prefill, decode, ran = asyncio.run(main())
    assert "gone" not in ran and "first" in ran
    assert_clean(prefill, decode)


def test_decode_pool_pressure_preempts_and_recomputes(tiny_llama):
    prompts = [[7 + i] * (30 + 5 * i) for i in range(6)]
    params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)

    async def main():
        prefill, decode = workers(tiny_llama, decode_pages=16)
        got = await asyncio.gather(*(tokens(decode, p, params, f"r{i}")
                                     for i, p in enumerate(prompts)))
        return prefill, decode, got

    prefill, decode, got = asyncio.run(main())
    ref = LLM(tiny_llama, num_pages=256).generate(prompts, params)
    assert got == [c.token_ids for c in ref]  # nothing truncated, nothing changed
    assert decode.engine.stats().num_preemptions > 0
    assert_clean(prefill, decode)


def test_cancel_while_reserving_frees_the_pages(tiny_llama):
    async def main():
        prefill, decode = workers(tiny_llama)
        for delay in range(6):  # cancel at successive suspension points of the request
            task = asyncio.create_task(tokens(decode, [9] * 40, GREEDY, f"c{delay}"))
            for _ in range(delay):
                await asyncio.sleep(0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await drained(prefill, decode)
        return prefill, decode

    assert_clean(*asyncio.run(main()))


class SenderGone:
    """Two prefill replicas on the gloo channel transport: the first answers, then goes away
    (its transport closes, its store and held KV with it) before decode fetches the pages."""

    def __init__(self, first: PrefillWorker, second: PrefillWorker) -> None:
        self.workers, self.calls = [first, second], 0

    async def prefill(self, *args):
        worker = self.workers[min(self.calls, 1)]
        self.calls += 1
        result = await worker.prefill(*args)
        if self.calls == 1:
            worker.transport.close()
        return result

    async def prefill_stream(self, *args):
        worker = self.workers[min(self.calls, 1)]
        self.calls += 1
        gone = self.calls == 1
        async for item in worker.prefill_stream(*args):
            yield item
            if gone:  # right after the KV handle, before decode can reach the sender
                worker.transport.close()
                gone = False


@pytest.mark.parametrize("layerwise", [False, True])
def test_kv_sender_lost_before_fetch_retries_elsewhere(tiny_llama, layerwise):
    from serving.replica import replica_lost

    fp = model_fingerprint(tiny_llama, "float32", "safetensors", 0)
    prompt = list(range(200, 250))

    async def main():
        prefills = [PrefillWorker(AsyncEngine(Engine(ModelConfig(tiny_llama), EngineConfig(
            page_size=16, num_pages=64))), make_transport("gloo", timeout_s=30), fp)
            for _ in range(2)]
        receive = make_transport("gloo", timeout_s=30)
        decode = DecodeWorker(AsyncEngine(Engine(ModelConfig(tiny_llama), EngineConfig(
            page_size=16, num_pages=64))), SenderGone(*prefills), receive, fp, timeout_s=30,
            retriable=replica_lost, layerwise=layerwise)
        try:
            got = await tokens(decode, prompt, GREEDY, "a")
        finally:
            for t in (receive, *(p.transport for p in prefills)):
                t.close()
        await drained(*prefills, decode)
        return prefills, decode, got

    prefills, decode, got = asyncio.run(main())
    assert got == LLM(tiny_llama, num_pages=64).generate(prompt, GREEDY)[0].token_ids
    assert decode.prefill.calls == 2
    assert decode.metrics.counters["pdserve_prefill_retries_total"] == 1
    assert_clean(*prefills, decode)


def test_kv_arriving_for_an_aborted_reservation_ends_the_stream(tiny_llama):
    """The reservation was aborted (client gone, token mailbox lost) while its KV was on the
    way: the late admit ends the request's stream as aborted and frees nothing twice."""
    async def main():
        engine = AsyncEngine(Engine(ModelConfig(tiny_llama), EngineConfig(page_size=16,
                                                                          num_pages=32)))
        rsv = await engine.reserve("late", list(range(40)), GREEDY)
        assert rsv is not None and engine.stats().pages_used == rsv.num_pages
        engine.abort("late")
        kv = torch.zeros(1)  # never read: there is no reservation to write it into
        outs = [o async for o in engine.admit_prefilled("late", 0, kv, 7)]
        await engine.check_integrity()
        return engine, outs

    engine, outs = asyncio.run(main())
    assert outs == [] and engine.stats().pages_used == 0

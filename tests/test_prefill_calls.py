"""A decode replica's prefill calls (decode/prefill_calls.py). The call goes out beside the
reservation, for the blocks the replica caches when the request comes, where its pool looks able
to take the prompt (decode/worker.py, step 2). Where the reservation turns out otherwise (it
starts at another block, or must wait for pages) that call is dropped and made again, under
another id: the tokens stay the colocated engine's and neither side keeps a page. A call
dropped as its answer came leaves that answer's KV to be released (`KVTransport.release`)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from decode.prefill_calls import PrefillCalls
from decode.worker import DecodeWorker
from engine.async_engine import AsyncEngine
from engine.config import EngineConfig, ModelConfig
from engine.llm import LLM
from engine.llm_engine import Engine
from engine.metrics import Metrics
from engine.sampling_params import SamplingParams
from kvtransfer import make_transport, model_fingerprint
from prefill.worker import PrefillWorker
from serving.pd_protocol import PrefillResult
from tests.test_disaggregated_inprocess import GREEDY, inline_pair, no_pages_left

LONG = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)


class CallLog:
    """The prefill worker as the decode worker calls it, each call logged as
    [request id, first block, how it ended]."""

    def __init__(self, worker: PrefillWorker) -> None:
        self.worker = worker
        self.calls: list[list] = []

    async def prefill(self, prompt_ids, params, request_id, first_block=0):
        call = [request_id, first_block, "running"]
        self.calls.append(call)
        try:
            result = await self.worker.prefill(prompt_ids, params, request_id, first_block)
        except asyncio.CancelledError:
            call[2] = "cancelled"
            raise
        call[2] = "done"
        return result


async def _tokens(decode: DecodeWorker, prompt: list[int], rid: str,
                  params: SamplingParams = GREEDY) -> list[int]:
    return [t async for out in decode.generate(prompt, params, rid) for t in out.new_token_ids]


async def wait_for(condition, what: str) -> None:
    """Until `condition()`; a hang guard of 30 s, not a timing bound."""
    for _ in range(3000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never: {what}")


async def _settle(decode: DecodeWorker) -> None:
    """Until the dropped calls' releases have ended."""
    await wait_for(lambda: not decode.calls.releases, "the dropped calls released")
    assert decode.calls.pending_pages == 0


def test_one_call_per_prompt_made_before_the_reservation_when_it_starts_as_expected(tiny_llama):
    shared = list(range(100, 164))  # 4 full blocks
    a, b = shared + [7, 8, 9], shared + [10, 11]

    async def main():
        prefill, decode = inline_pair(tiny_llama)
        decode.prefill = log = CallLog(prefill)
        got = [await _tokens(decode, a, "a"), await _tokens(decode, b, "b")]
        return prefill, decode, log.calls, got

    prefill, decode, calls, got = asyncio.run(main())
    assert got == [o.token_ids for o in LLM(tiny_llama, num_pages=128).generate([a, b], GREEDY)]
    assert calls == [["a", 0, "done"], ["b", 4, "done"]]  # b: its 4 blocks are cached here
    assert "pdserve_prefill_calls_dropped_total" not in decode.metrics.counters
    no_pages_left(prefill, decode)


def test_a_call_for_other_blocks_than_the_reservation_is_dropped_and_made_again(tiny_llama):
    """The cache read before the reservation said 0 blocks (as when they are cached between the
    two): the reservation starts at block 4, so the call for block 0 is dropped."""
    shared = list(range(100, 164))
    a, b = shared + [7, 8, 9], shared + [10, 11]

    async def main():
        prefill, decode = inline_pair(tiny_llama)
        decode.prefill = log = CallLog(prefill)
        first = await _tokens(decode, a, "a")
        decode.engine.cached_prefix_tokens = lambda prompt_ids, hashes=None: 0
        second = await _tokens(decode, b, "b")
        await _settle(decode)
        return prefill, decode, log.calls, [first, second]

    prefill, decode, calls, got = asyncio.run(main())
    assert got == [o.token_ids for o in LLM(tiny_llama, num_pages=128).generate([a, b], GREEDY)]
    assert [c[:2] for c in calls] == [["a", 0], ["b", 0], ["b-again", 4]]
    # dropped: aborted, or (had it ended first) its KV released
    assert calls[1][2] in ("cancelled", "done") and calls[2][2] == "done"
    assert decode.metrics.counters["pdserve_kv_transfer_blocks_skipped_total"] == 4
    assert decode.metrics.counters["pdserve_prefill_calls_dropped_total"] == 1
    no_pages_left(prefill, decode)


def _full_pool_run(tiny_llama: str, hint: int | None) -> tuple[list[list], int]:
    """A decode pool of 16 pages, 14 of them held by a long request when a 40-token prompt (3
    pages) comes; the pool's free-page hint read as `hint` if given. Checks both requests'
    tokens and that no page is left; returns the prefill calls and how many were dropped."""
    cfg = EngineConfig(page_size=16, num_pages=16)
    fp = model_fingerprint(tiny_llama, "float32", "safetensors", 0)
    transport = make_transport("inline")
    a, b = [5] * 16, [6] * 40  # a: 216 tokens = 14 pages at the end

    async def main():
        prefill = PrefillWorker(AsyncEngine(Engine(ModelConfig(tiny_llama), cfg)), transport, fp)
        log = CallLog(prefill)
        decode = DecodeWorker(AsyncEngine(Engine(ModelConfig(tiny_llama), cfg)), log,
                              transport, fp)
        first = asyncio.ensure_future(_tokens(decode, a, "a", LONG))
        while decode.engine.stats().pages_used < 14:  # a grew to its last page
            await asyncio.sleep(0.001)
        if hint is not None:  # as when the pool filled up between the hint and the reservation
            decode.engine.free_pages_hint = lambda: hint
        second = await _tokens(decode, b, "b")
        got = [await first, second]
        await _settle(decode)
        return prefill, decode, log.calls, got

    prefill, decode, calls, got = asyncio.run(main())
    llm = LLM(tiny_llama, num_pages=128)
    assert got == [llm.generate([a], LONG)[0].token_ids, llm.generate([b], GREEDY)[0].token_ids]
    no_pages_left(prefill, decode)
    return calls, decode.metrics.counters.get("pdserve_prefill_calls_dropped_total", 0)



def test_no_early_call_where_the_pool_looks_too_full_for_the_prompt(tiny_llama):
    calls, dropped = _full_pool_run(tiny_llama, hint=None)
    assert calls == [["a", 0, "done"], ["b", 0, "done"]]  # b's once its pages were reserved
    assert dropped == 0


def test_a_call_whose_reservation_waits_for_pages_is_dropped_and_made_again(tiny_llama):
    calls, dropped = _full_pool_run(tiny_llama, hint=1000)
    assert [c[:2] for c in calls] == [["a", 0], ["b", 0], ["b-again", 0]]
    assert dropped == 1
    assert calls[1][2] in ("cancelled", "done") and calls[2][2] == "done"


def test_early_calls_count_the_pages_of_the_reservations_still_to_come(tiny_llama):
    """Four 40-token prompts (3 pages each) come at once to a pool of 10 free pages: three
    calls go early, the fourth waits for its reservation."""
    prompts = [[7 + i] * 40 for i in range(4)]

    async def main():
        prefill, decode = inline_pair(tiny_llama)
        decode.prefill = log = CallLog(prefill)
        decode.engine.free_pages_hint = lambda: 10
        early = []
        start = decode.calls.early

        def counted(*args):
            early.append(start(*args))
            return early[-1]

        decode.calls.early = counted
        got = await asyncio.gather(*[_tokens(decode, p, f"r{i}") for i, p in enumerate(prompts)])
        await _settle(decode)
        return prefill, decode, early, log.calls, got

    prefill, decode, early, calls, got = asyncio.run(main())
    assert got == [o.token_ids for o in LLM(tiny_llama, num_pages=128).generate(prompts, GREEDY)]
    assert [e is not None for e in early] == [True, True, True, False]
    assert sorted(c[0] for c in calls) == ["r0", "r1", "r2", "r3"]  # one call each, none dropped
    no_pages_left(prefill, decode)


class AnswerFirst:
    """A Prefiller whose answer comes as the call is cancelled: it returns it all the same, as
    PrefillClient does when the answer came first (decode/deployment.py)."""

    def __init__(self) -> None:
        self.started = asyncio.Event()

    async def prefill(self, prompt_ids, params, request_id, first_block=0):
        self.started.set()
        try:
            await asyncio.Event().wait()  # until cancelled
        except asyncio.CancelledError:
            return PrefillResult(7, None, f"kv-of-{request_id}", 0)


class ReleasedKV:
    """A transport that records what it was asked to release."""

    def __init__(self) -> None:
        self.released: list[object] = []

    async def release(self, handle, device):
        self.released.append((handle, device))


def test_a_caller_cancelled_as_the_answer_came_leaves_its_kv_to_be_released():
    async def main():
        transport = ReleasedKV()
        metrics = Metrics("decode", "t")
        calls = PrefillCalls(SimpleNamespace(device="cpu"), transport, metrics)
        prefill = AnswerFirst()
        call = calls.start(prefill, [1, 2, 3], GREEDY, "r", 0)
        caller = asyncio.ensure_future(calls.result(call))
        await prefill.started.wait()
        caller.cancel()  # the client went away
        with pytest.raises(asyncio.CancelledError):
            await caller
        await wait_for(lambda: not calls.releases, "the answer's KV released")
        calls.drop(call)  # a second drop does nothing
        return call, transport.released, calls.releases, metrics.counters

    call, released, releases, counters = asyncio.run(main())
    assert call.dropped and call.task.result().kv == "kv-of-r"
    assert counters["pdserve_prefill_calls_dropped_total"] == 1
    assert released == [("kv-of-r", "cpu")] and not releases  # released once


def test_an_answer_for_no_call_is_released():
    """(Its caller left and its abort came too late: serving/batched_submit.py's `unclaimed`.)"""
    async def main():
        transport = ReleasedKV()
        calls = PrefillCalls(SimpleNamespace(device="cpu"), transport, Metrics("decode", "t"))
        calls.release(PrefillResult(7, None, "kv-of-nobody", 0))
        while calls.releases:  # ends as soon as the release has run
            await asyncio.sleep(0)
        return transport.released

    assert asyncio.run(main()) == [("kv-of-nobody", "cpu")]

"""A decode replica streams a request's first token as soon as a prefill replica answers, while
the prompt's KV is still on the way (decode/worker.py, step 3): the client's first token waits
for the prefill, not for the transfer too. A first token that ends the request is its only
output, and its reservation and the prefill's KV are freed; a retry's answer (the KV was lost
after the first token went out) brings only the KV.

A transport whose receives wait at a gate holds the KV on the way for as long as a test needs."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import pytest

from decode.worker import DecodeWorker
from engine.async_engine import AsyncEngine
from engine.config import EngineConfig, ModelConfig
from engine.llm import LLM
from engine.llm_engine import Engine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from kvtransfer import KVPayload, model_fingerprint
from kvtransfer.inline import InlineTransport
from prefill.worker import PrefillWorker

PROMPT = list(range(100, 140))
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
HANG_S = 60  # a hang guard, not a speed bound


class ReplicaLost(Exception):
    pass


class GatedTransport(InlineTransport):
    """The inline transport, whose receives wait until `gate` is set; the first `lose` of them
    then fail as a KV lost with its prefill replica would."""

    def __init__(self, lose: int = 0) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.waiting = 0  # receives at the gate now
        self.lose = lose

    async def receive(self, handle: object, device) -> KVPayload:
        self.waiting += 1
        try:
            await self.gate.wait()
        finally:
            self.waiting -= 1
        if self.lose:
            self.lose -= 1
            raise ReplicaLost("the KV went with its prefill replica")
        return await super().receive(handle, device)


class OtherFirstTokenOnRetry:
    """Answers through `worker`; every answer after the first carries another first token, as a
    sampled request's retry may: the stream must go on from the first answer's token."""

    def __init__(self, worker: PrefillWorker) -> None:
        self.worker, self.calls = worker, 0

    async def prefill(self, *args):
        self.calls += 1
        result = await self.worker.prefill(*args)
        if self.calls > 1:
            result = dataclasses.replace(result, first_token=(result.first_token + 1) % 1000)
        return result


class ListSink:
    """An OutputSink that keeps what it is given (on the engine's step thread)."""

    def __init__(self) -> None:
        self.outputs: list[RequestOutput] = []
        self.got_one = threading.Event()

    def put(self, out: RequestOutput) -> None:
        self.outputs.append(out)
        self.got_one.set()

    def flush(self) -> None:
        pass


def workers(path: str, transport: GatedTransport, other_token_on_retry: bool = False):
    fp = model_fingerprint(path, "float32", "safetensors", 0)
    prefill = PrefillWorker(AsyncEngine(Engine(ModelConfig(path), EngineConfig(
        page_size=16, num_pages=64))), transport, fp)
    caller = OtherFirstTokenOnRetry(prefill) if other_token_on_retry else prefill
    decode = DecodeWorker(AsyncEngine(Engine(ModelConfig(path), EngineConfig(
        page_size=16, num_pages=64))), caller, transport, fp, timeout_s=HANG_S,
        retriable=lambda e: isinstance(e, ReplicaLost))
    return prefill, decode


async def until(cond) -> None:
    for _ in range(HANG_S * 100):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


async def clean(*ws) -> None:
    """Every engine's queued actions have run, its pages are all free and its books agree."""
    for w in ws:
        await w.engine.check_integrity()
        assert w.engine.stats().pages_used == 0


def tokens(outs: list[RequestOutput]) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


@pytest.fixture(scope="module")
def reference(tiny_llama) -> list[int]:
    return LLM(tiny_llama, num_pages=64).generate(PROMPT, GREEDY)[0].token_ids


def test_the_first_token_comes_before_the_kv(tiny_llama, reference):
    async def main():
        transport = GatedTransport()
        prefill, decode = workers(tiny_llama, transport)
        stream = decode.generate(PROMPT, GREEDY, "a")
        first = await asyncio.wait_for(anext(stream), HANG_S)
        # The KV is at the gate; the request holds its reservation and has not joined the batch.
        assert transport.waiting == 1
        scheduler = decode.engine.engine.scheduler
        assert list(scheduler.reserved) == ["a"] and scheduler.running == []
        transport.gate.set()
        rest = [out async for out in stream]
        await clean(prefill, decode)
        return first, rest

    first, rest = asyncio.run(main())
    assert first.new_token_ids == reference[:1] and not first.finished
    assert first.num_output_tokens == 1 and first.num_prompt_tokens == len(PROMPT)
    assert tokens(rest) == reference[1:] and rest[-1].finish_reason == "length"


def test_a_sink_gets_the_first_token_before_the_kv(tiny_llama, reference):
    async def main():
        transport = GatedTransport()
        prefill, decode = workers(tiny_llama, transport)
        sink = ListSink()
        run = asyncio.ensure_future(_collect(decode.generate(PROMPT, GREEDY, "a", sink)))
        await until(sink.got_one.is_set)
        assert transport.waiting == 1
        got_before_kv = list(sink.outputs)
        transport.gate.set()
        streamed = await asyncio.wait_for(run, HANG_S)
        await clean(prefill, decode)
        return got_before_kv, sink.outputs, streamed

    before, outputs, streamed = asyncio.run(main())
    assert tokens(before) == reference[:1]
    assert tokens(outputs) == reference and outputs[-1].finished
    assert streamed == outputs[-1:]  # with a sink, the stream yields only the last output


@pytest.mark.parametrize("ends", ["max_tokens", "stop_token"])
def test_a_first_token_that_ends_the_request_is_its_only_output(tiny_llama, reference, ends):
    params = (SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
              if ends == "max_tokens" else
              SamplingParams(max_tokens=24, temperature=0.0, stop_token_ids=reference[:1]))

    async def main():
        transport = GatedTransport()
        prefill, decode = workers(tiny_llama, transport)
        sink = ListSink()
        run = asyncio.ensure_future(_collect(decode.generate(PROMPT, params, "a", sink)))
        await until(sink.got_one.is_set)
        before_kv = list(sink.outputs)  # the request is over while its KV is on the way
        transport.gate.set()  # the KV is received and thrown away
        streamed = await asyncio.wait_for(run, HANG_S)
        await clean(prefill, decode)
        return before_kv, sink.outputs, streamed, decode

    before_kv, outputs, streamed, decode = asyncio.run(main())
    assert outputs == before_kv and streamed == before_kv and len(before_kv) == 1
    assert before_kv[0].new_token_ids == reference[:1] and before_kv[0].finished
    assert before_kv[0].finish_reason == ("length" if ends == "max_tokens" else "stop")
    assert decode.engine.engine.scheduler.requests == {}
    assert decode.metrics.counters["pdserve_prompt_tokens_total"] == len(PROMPT)


def test_a_kv_lost_after_the_first_token_is_fetched_again_and_the_first_token_stands(
        tiny_llama, reference):
    async def main():
        transport = GatedTransport(lose=1)
        prefill, decode = workers(tiny_llama, transport, other_token_on_retry=True)
        stream = decode.generate(PROMPT, GREEDY, "a")
        first = await asyncio.wait_for(anext(stream), HANG_S)
        transport.gate.set()  # the first KV is lost; the retry's answer has another token
        rest = [out async for out in stream]
        await clean(prefill, decode)
        return first, rest, decode

    first, rest, decode = asyncio.run(main())
    assert tokens([first, *rest]) == reference
    assert decode.prefill.calls == 2
    assert decode.metrics.counters["pdserve_prefill_retries_total"] == 1


def test_a_client_gone_after_the_first_token_frees_the_reservation(tiny_llama, reference):
    async def main():
        transport = GatedTransport()
        prefill, decode = workers(tiny_llama, transport)
        stream = decode.generate(PROMPT, GREEDY, "a")
        first = await asyncio.wait_for(anext(stream), HANG_S)
        await stream.aclose()  # the client disconnects while the KV is on the way
        transport.gate.set()
        await clean(prefill, decode)
        return first, decode

    first, decode = asyncio.run(main())
    assert first.new_token_ids == reference[:1]
    assert decode.engine.engine.scheduler.requests == {}


async def _collect(stream) -> list[RequestOutput]:
    return [out async for out in stream]

"""Prompts many to a Serve call from a decode replica to the prefill deployment
(`decode.prefill_batch`): the decode side's PrefillClient (decode/deployment.py) over a
SubmitBatcher, the prefill side's `Replica.call_many` with a real PrefillWorker behind it, and
the aborts that travel over the decode replica's token socket. Only the Serve handle is played
by the test: it hands each call to `call_many` in this process."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import pytest

from decode.deployment import PrefillClient, prefill_batch
from engine.llm import LLM
from engine.metrics import Metrics
from kvtransfer import make_transport
from serving.batched_runs import BatchedRuns
from serving.replica import Replica
from serving.sink_set import SinkSet
from tests.test_disaggregated_inprocess import GREEDY, inline_pair, no_pages_left
from tests.test_prefill_calls import wait_for
from tests.test_token_path import FakeResponse


class CallingReplica:
    """Replica's paths for calls whose values go back in the call (`call_one`, `stream_one`,
    `call_many`), over a BatchedRuns and a SinkSet whose sockets carry the aborts; `engine`,
    once set, is the one a lost socket's requests are aborted on (Replica's `_abort_all`)."""

    call_one, stream_one, call_many = Replica.call_one, Replica.stream_one, Replica.call_many
    _abort_all = Replica._abort_all

    def __init__(self) -> None:
        self.batched = BatchedRuns()
        self.engine = None
        self.sinks = SinkSet(Metrics("prefill", "test"), on_lost=self._lost,
                             on_abort=self.batched.abort)

    def _lost(self, request_ids: list[str]) -> None:
        if self.engine is not None:
            self._abort_all(request_ids)


class PrefillHandle:
    """The prefill deployment's handle: `prefill_many` runs `Replica.call_many` on a stand-in
    replica over `worker`, `prefill` its `call_one` (as the prefill deployment does, given the
    caller's address). A `prefill_many` call may wait for `gate` before it starts; `calls`
    lists each call's ids."""

    def __init__(self, worker) -> None:
        self.replica = CallingReplica()
        self.worker = worker
        self.prefill_many = self
        self.prefill = SimpleNamespace(remote=self._call_one)
        self.calls: list[list[str]] = []
        self.gate = asyncio.Event()
        self.gate.set()

    def _call_one(self, *args, address) -> FakeResponse:
        self.calls.append([args[2]])
        run = asyncio.ensure_future(self.replica.call_one(address, args[2],
                                                          lambda: self.worker.prefill(*args)))
        return FakeResponse(run)

    def options(self, stream: bool) -> PrefillHandle:
        assert stream
        return self

    def remote(self, requests: list[tuple], address):
        self.calls.append([r[2] for r in requests])
        return self._call(requests, address)

    async def _call(self, requests, address):
        await self.gate.wait()
        async for item in self.replica.call_many(requests, address,
                                                 lambda r: self.worker.prefill(*r)):
            yield item


class HeldStep:
    """The prefill engine's step thread waits in its `nth` step until `released` is set (a
    hang guard of 30 s, not a timing bound); `steps` counts the steps begun."""

    def __init__(self, engine, nth: int) -> None:
        self.steps, self.released = [], threading.Event()
        step = engine.step

        def held_step():
            self.steps.append(1)
            if len(self.steps) == nth:
                assert self.released.wait(30), "hang guard"
            return step()

        engine.step = held_step


def test_a_wave_of_prompts_goes_in_two_calls_with_the_colocated_tokens(tiny_llama):
    prompts = [[5 + i] * (10 + 7 * i) for i in range(6)]

    async def main():
        prefill, decode = inline_pair(tiny_llama)
        handle = PrefillHandle(prefill)
        decode.prefill = client = PrefillClient(handle, timeout_s=60, max_batch=8)
        handle.gate.clear()  # the first call is not accepted until the others queue behind it
        tasks = [asyncio.ensure_future(_collect(decode, p, f"r{i}"))
                 for i, p in enumerate(prompts)]
        await wait_for(lambda: len(client.batcher._queued) == 5, "five prompts queued")
        handle.gate.set()
        results = await asyncio.gather(*tasks)
        client.close()
        return prefill, decode, handle.calls, results

    prefill, decode, calls, results = asyncio.run(main())
    ref = LLM(tiny_llama, num_pages=128).generate(prompts, GREEDY)
    assert results == [o.token_ids for o in ref]
    assert [len(c) for c in calls] == [1, 5]
    assert sorted(calls[0] + calls[1]) == [f"r{i}" for i in range(6)]
    assert prefill.metrics.counters["pdserve_requests_total"] == 6
    no_pages_left(prefill, decode)


def test_an_abort_reaches_the_prefill_replica_over_the_socket_and_frees_its_pages(tiny_llama):
    """The client leaves while its prompt is half prefilled (the prefill's step thread held
    before its second chunk): the prefill replica's task is cancelled through the socket while
    its call goes on, the prefill engine drops the prompt before it ends, and neither side
    holds a page. The prompt of the next call is served."""
    long_prompt = [3] * 160  # 10 chunks of 16 tokens

    async def main():
        prefill, decode = inline_pair(tiny_llama, max_num_batched_tokens=16)
        held = HeldStep(prefill.engine.engine, 2)  # it stops after its first chunk
        handle = PrefillHandle(prefill)
        decode.prefill = client = PrefillClient(handle, timeout_s=60, max_batch=8)
        gone = asyncio.ensure_future(_collect(decode, long_prompt, "gone"))
        await wait_for(lambda: len(held.steps) == 2, "the prefill's second chunk")
        stays = asyncio.ensure_future(_collect(decode, [4] * 20, "stays"))
        await wait_for(lambda: "stays" in handle.replica.batched.tasks, "a second call")
        gone.cancel()
        await wait_for(lambda: "gone" not in handle.replica.batched.tasks,
                       "the abort at the prefill replica")
        held.released.set()
        kept = await stays
        with pytest.raises(asyncio.CancelledError):
            await gone
        for worker in (prefill, decode):  # the audit queues behind the abort: it ran by then
            await worker.engine.check_integrity()
        client.close()
        return prefill, decode, handle.calls, kept

    prefill, decode, calls, kept = asyncio.run(main())
    assert calls == [["gone"], ["stays"]]
    assert kept == LLM(tiny_llama, num_pages=128).generate([[4] * 20], GREEDY)[0].token_ids
    # counted when a prefill ends: only "stays" did
    assert prefill.metrics.counters["pdserve_prompt_tokens_total"] == 20
    no_pages_left(prefill, decode)


class AnsweredPrefillHandle:
    """The prefill deployment's handle for calls of one prompt, each run by `worker` to the
    end: its response's `cancel()` comes too late to stop it, as Serve's does where the replica
    had answered before the cancellation reached it."""

    def __init__(self, worker) -> None:
        self.worker, self.prefill = worker, self
        self.runs: list[asyncio.Task] = []

    def remote(self, *args, address) -> AnsweredResponse:  # (no socket: it never aborts)
        self.runs.append(asyncio.ensure_future(self.worker.prefill(*args)))
        return AnsweredResponse(asyncio.shield(self.runs[-1]))  # awaited here, run there


class AnsweredResponse(FakeResponse):
    """A response whose replica had answered: cancelling it stops nothing."""

    def cancel(self) -> None:
        self.cancelled = True  # and the run goes on


def test_an_answer_that_comes_after_its_caller_left_has_its_kv_released(tiny_llama):
    """A call of one prompt (`prefill_batch: 1`): the client leaves while the prompt is being
    prefilled, and the prefill ends all the same. Its answer goes to the decode replica's
    PrefillCalls, which receives its KV and throws it away (with `cuda_ipc`, the prefill
    replica's export of it is then released)."""
    received = []

    async def main():
        prefill, decode = inline_pair(tiny_llama, max_num_batched_tokens=16)
        held = HeldStep(prefill.engine.engine, 1)
        receive = decode.transport.receive

        async def recorded_receive(handle, device):
            received.append(handle)
            return await receive(handle, device)

        decode.transport.receive = recorded_receive  # the decode side's receipts
        handle = AnsweredPrefillHandle(prefill)
        decode.prefill = client = PrefillClient(handle, timeout_s=60)
        client.unclaimed = decode.calls.release
        gone = asyncio.ensure_future(_collect(decode, [3] * 40, "gone"))
        await wait_for(lambda: len(held.steps) == 1, "the prefill's first step")
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        held.released.set()
        answer = await handle.runs[0]
        await wait_for(lambda: received and not decode.calls.releases,
                       "the answer's KV received")
        return prefill, decode, answer

    prefill, decode, answer = asyncio.run(main())
    assert received == [answer.kv]
    assert decode.metrics.counters["pdserve_prefill_calls_dropped_total"] == 1
    no_pages_left(prefill, decode)


@pytest.mark.parametrize("max_batch", [8, 1])
def test_a_decode_replica_that_goes_away_has_its_prompts_aborted_on_the_prefill_replica(
        tiny_llama, max_batch):
    """Its socket closes (as when its process dies) while its prompt is half prefilled: the
    prompt is aborted there and then, not prefilled for nobody with its KV left unreceived.
    So with calls of one prompt too (`max_batch` 1, whose aborts go as Serve's cancels)."""
    async def main():
        prefill, _ = inline_pair(tiny_llama, max_num_batched_tokens=16)
        held = HeldStep(prefill.engine.engine, 2)
        handle = PrefillHandle(prefill)
        handle.replica.engine = prefill.engine  # the prefill replica's sinks abort on it
        client = PrefillClient(handle, timeout_s=60, max_batch=max_batch)
        call = asyncio.ensure_future(client.prefill([3] * 160, GREEDY, "orphan", 0))
        await wait_for(lambda: len(held.steps) == 2, "the prefill's second chunk")
        client.close()  # the decode replica goes: its socket closes, no abort is sent
        with pytest.raises(RuntimeError, match="prefill of orphan ended without a token"):
            await call  # (here the call's stream still reaches it)
        held.released.set()
        await prefill.engine.check_integrity()
        return prefill

    prefill = asyncio.run(main())
    assert "pdserve_prompt_tokens_total" not in prefill.metrics.counters  # it never ended
    no_pages_left(prefill)


async def _collect(decode, prompt: list[int], rid: str) -> list[int]:
    return [t async for out in decode.generate(prompt, GREEDY, rid) for t in out.new_token_ids]


def test_a_transport_whose_handles_hold_object_refs_gets_a_call_per_prompt():
    """The `ray` transport's handles are object refs, which a streaming call's items may lose
    (kvtransfer/transport.py): its prefill calls carry one prompt whatever the config says."""
    from kvtransfer.ray_object_store import RayObjectStoreTransport

    assert RayObjectStoreTransport.handle_holds_object_refs
    assert prefill_batch(32, RayObjectStoreTransport()) == 1
    assert prefill_batch(32, make_transport("inline")) == 32
    assert prefill_batch(1, make_transport("inline")) == 1


class OnePrefillHandle:
    """The prefill deployment's handle for calls of one prompt (`prefill`): each call's
    response, which the test ends, is in `responses`."""

    def __init__(self) -> None:
        self.prefill = self
        self.responses: list[FakeResponse] = []

    def remote(self, *args, address) -> FakeResponse:
        self.responses.append(FakeResponse(asyncio.get_running_loop().create_future()))
        return self.responses[-1]


@pytest.mark.parametrize("batched", [False, True])
def test_a_call_cancelled_after_its_answer_came_returns_the_answer(batched):
    """The answer's KV waits on the prefill replica until it is received: a prefill client
    cancelled once the answer is in returns it, so that its caller releases it
    (decode/prefill_calls.py); cancelled before, it aborts the call."""
    async def main():
        if batched:
            handle = PrefillHandle(worker=None)
            handle.gate.clear()  # the calls are never accepted: nothing runs them
            client = PrefillClient(handle, timeout_s=60, max_batch=8)
        else:
            handle = OnePrefillHandle()
            client = PrefillClient(handle, timeout_s=60)
        came = asyncio.ensure_future(client.prefill([1], GREEDY, "came", 0))
        gone = asyncio.ensure_future(client.prefill([2], GREEDY, "gone", 0))
        await asyncio.sleep(0)
        if batched:
            futures = {rid: f for rid, (_, f) in client.batcher._queued.items()}
            futures.update({rid: call.futures[rid] for rid, call in client.batcher._calls.items()})
        else:
            futures = {"came": handle.responses[0].result, "gone": handle.responses[1].result}
        # The answer comes as the cancellation is on its way: neither has reached `came` yet.
        # (The order puts each case's answer in before `came` resumes; the other order would
        # leave the unary answer's task one step behind, or let Python 3.11's wait_for return
        # the batched answer itself.)
        if batched:
            came.cancel()
            futures["came"].set_result("the answer")
        else:
            futures["came"].set_result("the answer")
            came.cancel()
        gone.cancel()
        answer = await came
        with pytest.raises(asyncio.CancelledError):
            await gone
        client.close()
        return answer, futures["gone"], handle

    answer, gone, handle = asyncio.run(main())
    assert answer == "the answer"
    assert gone.cancelled()
    if not batched:
        assert [r.cancelled for r in handle.responses] == [False, True]

"""The token path in one message per step: an AsyncEngine hands a sink every output of a step at
once; the ingress side fans batches out to per-request queues (serving/token_mailbox.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import pickle
import threading

import pytest

from engine.async_engine import AsyncEngine
from engine.llm import LLM
from engine.metrics import Metrics, StreamRecorder, record_step
from engine.outputs import RequestOutput, TokenLogprob
from engine.sampling_params import SamplingParams
from serving.token_fanout import Fanout

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


class RecordingSink:
    def __init__(self) -> None:
        self.pending: list[RequestOutput] = []
        self.batches: list[list[RequestOutput]] = []

    def put(self, out: RequestOutput) -> None:
        self.pending.append(out)

    def flush(self) -> None:
        self.batches.append(self.pending)
        self.pending = []


def test_a_sink_gets_one_batch_per_step_and_streams_yield_only_the_end(tiny_llama):
    # Overlap off whatever the device: with it, outputs come one step() call later, so the
    # count of steps below would be one more.
    llm = LLM(tiny_llama, num_pages=64, overlap_scheduling="off")
    prompts = [[5, 6, 7], [8, 9, 10, 11]]
    ref = llm.generate(prompts, GREEDY)

    async def main():
        engine = AsyncEngine(llm.engine)
        sink = RecordingSink()
        # The step thread is held inside an action while both requests are submitted, so it
        # takes both adds in one round (a timed wait raced with its wake-up and let the first
        # add run a step alone on a loaded machine).
        held, gate = threading.Event(), threading.Event()
        engine.run_soon(lambda: (held.set(), gate.wait(60)))
        await asyncio.to_thread(held.wait, 60)  # a hang guard, not a speed bound
        tasks = [asyncio.create_task(_collect(engine.generate(p, GREEDY, f"r{i}", sink=sink)))
                 for i, p in enumerate(prompts)]
        await asyncio.sleep(0)  # each task runs to its first await: both adds are submitted
        gate.set()
        streams = await asyncio.gather(*tasks)
        engine.close()
        return engine, sink, streams

    engine, sink, streams = asyncio.run(main())
    # Both requests joined in the first step: six steps, each one batch of both requests.
    assert [[o.request_id for o in b] for b in sink.batches] == [["r0", "r1"]] * 6
    assert engine.stepper.num_steps == 6
    for i, c in enumerate(ref):
        outs = [o for b in sink.batches for o in b if o.request_id == f"r{i}"]
        assert [t for o in outs for t in o.new_token_ids] == c.token_ids
        assert [o.finished for o in outs] == [False] * 5 + [True]
        assert len(streams[i]) == 1 and streams[i][0] is outs[-1]  # the stream: the end only
    assert llm.engine.num_pages_used == 0


async def _collect(stream) -> list[RequestOutput]:
    return [out async for out in stream]


def test_a_sink_request_cancelled_mid_way_is_aborted(tiny_llama):
    llm = LLM(tiny_llama, num_pages=64)
    long = SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True)

    async def main():
        engine = AsyncEngine(llm.engine)
        sink = RecordingSink()
        task = asyncio.create_task(_collect(engine.generate([5, 6, 7], long, "gone", sink=sink)))
        for _ in range(6000):  # a hang guard: wait for the third token to reach the sink
            if sum(len(b) for b in sink.batches) >= 3:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        stats = await engine.check_integrity()  # queued behind the abort
        return sink, stats

    sink, stats = asyncio.run(main())
    outs = [o for b in sink.batches for o in b]
    assert 3 <= len(outs) < 500 and not any(o.finished for o in outs)
    assert stats.pages_used == 0 and stats.num_running == 0


@pytest.mark.anyio
async def test_fanout_routes_batches_to_open_requests_in_order():
    fan = Fanout()
    a, b = fan.open("a"), fan.open("b")
    out = [RequestOutput(rid, [t], "", finished=False) for rid, t in
           [("a", 1), ("b", 2), ("gone", 9), ("a", 3)]]
    fan.deliver(out)
    assert [a.get_nowait().new_token_ids for _ in range(2)] == [[1], [3]]
    assert b.get_nowait().new_token_ids == [2] and b.empty()
    with pytest.raises(ValueError, match="already running"):
        fan.open("a")
    fan.close("a")
    fan.deliver([RequestOutput("a", [4], "", finished=False)])
    assert a.empty()  # closed: dropped
    boom = RuntimeError("mailbox lost")
    fan.fail(boom)
    assert b.get_nowait() is boom


class FakeResponse:
    """A DeploymentResponse stand-in: awaitable, cancellable."""

    def __init__(self, result: asyncio.Future) -> None:
        self.result, self.cancelled = result, False

    def __await__(self):
        return self.result.__await__()

    def cancel(self) -> None:
        self.cancelled = True
        self.result.cancel()


class FakeDeployment:
    """`handle.run.remote(...)` as the ingress calls it; the test plays the replica."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.responses: list[FakeResponse] = []
        self.run = self

    def remote(self, *args) -> FakeResponse:
        self.calls.append(args)
        self.responses.append(FakeResponse(asyncio.get_running_loop().create_future()))
        return self.responses[-1]


class FakeReader(Fanout):
    mailbox = "the-mailbox"


def _out(rid: str, tok: int, finished: bool = False) -> RequestOutput:
    return RequestOutput(rid, [tok], "", finished=finished, finish_reason="length" if finished
                         else None)


@pytest.mark.anyio
async def test_mailbox_call_yields_every_token_then_ends_even_if_the_call_returns_first():
    from api.mailbox_call import mailbox_call

    handle, reader = FakeDeployment(), FakeReader()
    stream = mailbox_call(handle.run.remote, reader, [1, 2], GREEDY, "r", timeout_s=60)
    first = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)
    assert handle.calls == [([1, 2], GREEDY, "r", "the-mailbox")]
    reader.deliver([_out("r", 7), _out("r", 8)])
    handle.responses[0].result.set_result(None)  # the call ends before the last batch lands
    got = [(await first).new_token_ids]
    got.append((await anext(stream)).new_token_ids)
    later = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)
    reader.deliver([_out("r", 9, finished=True)])
    last = await later
    assert got + [last.new_token_ids] == [[7], [8], [9]] and last.finished
    with pytest.raises(StopAsyncIteration):
        await anext(stream)
    assert not handle.responses[0].cancelled and "r" not in reader.queues


@pytest.mark.anyio
async def test_mailbox_call_raises_the_replica_error_and_cancels_when_left_early():
    from api.mailbox_call import mailbox_call

    handle, reader = FakeDeployment(), FakeReader()
    stream = mailbox_call(handle.run.remote, reader, [1], GREEDY, "bad", timeout_s=60)
    pending = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)
    handle.responses[0].result.set_exception(ValueError("the prompt is empty"))
    with pytest.raises(ValueError, match="prompt is empty"):
        await pending

    stream = mailbox_call(handle.run.remote, reader, [1], GREEDY, "left", timeout_s=60)
    pending = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)
    reader.deliver([_out("left", 3)])
    assert (await pending).new_token_ids == [3]
    await stream.aclose()  # the client went away mid-stream
    assert handle.responses[1].cancelled and "left" not in reader.queues


@pytest.mark.anyio
async def test_mailbox_call_coalesces_only_when_asked_and_busy():
    from api.mailbox_call import Coalescing, mailbox_call

    handle, reader = FakeDeployment(), FakeReader()
    busy = Coalescing(interval_s=0.001, busy_streams=0)
    stream = mailbox_call(handle.run.remote, reader, [1], GREEDY, "c", timeout_s=60,
                          coalescing=busy)
    pending = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)
    reader.deliver([_out("c", 1), _out("c", 2), _out("c", 3, finished=True)])
    merged = await pending
    assert merged.new_token_ids == [1, 2, 3] and merged.finished and busy.open == 1
    await stream.aclose()
    assert busy.open == 0


def test_a_step_is_recorded_as_its_outputs_reached_the_sink():
    """`record_step` (the mailbox sink's per-step recording, and `StreamRecorder.observe`'s
    one-output case): TTFT from each request's start, time per token since its last output,
    token and finish counts; outputs of requests without a recorder are not counted."""
    steps = [[RequestOutput("a", [1], "", False), RequestOutput("b", [2], "", False)],
             [RequestOutput("a", [3, 4], "", False), RequestOutput("gone", [9], "", False)],
             [RequestOutput("a", [5], "", True, "length"),
              RequestOutput("b", [], "", True, "abort")]]
    metrics = Metrics("decode", "x")
    recorders = {rid: StreamRecorder(metrics, 0.5) for rid in ("a", "b")}
    for now, outs in zip((1.0, 1.5, 2.25), steps):
        record_step(metrics, recorders, outs, now)
    ttft = metrics.histograms["pdserve_ttft_seconds"]
    tpot = metrics.histograms["pdserve_time_per_output_token_seconds"]
    assert (ttft.count, ttft.sum) == (2, 1.0)  # a and b first at 1.0, started at 0.5
    assert (tpot.count, tpot.sum) == (2, 1.0)  # a: 0.5 s / 2 tokens, then 0.75 s / 1 token
    assert metrics.counters["pdserve_generated_tokens_total"] == 5
    assert metrics.counters["pdserve_requests_finished_total"] == 2
    assert metrics.counters["pdserve_requests_finished_length_total"] == 1
    assert metrics.counters["pdserve_requests_finished_abort_total"] == 1


def test_outputs_cross_the_wire_as_tuples_and_come_back_equal():
    out = RequestOutput("r", [7, 8], "hi", True, "stop", [TokenLogprob(7, -0.5, [(7, -0.5)])],
                        num_prompt_tokens=3, num_output_tokens=2, num_cached_tokens=16,
                        prompt_logprobs=[None, TokenLogprob(1, -2.0)])
    wire = out.to_wire()
    assert type(wire) is tuple and wire[0] == "r"
    assert RequestOutput.from_wire(pickle.loads(pickle.dumps(wire))) == out


def test_evolve_is_dataclasses_replace_and_leaves_the_original_alone():
    out = RequestOutput("r", [7], "", False, new_logprobs=[TokenLogprob(7, -0.5)],
                        num_output_tokens=1)
    new = out.evolve(new_text="hi", finished=True, finish_reason="stop")
    assert new == dataclasses.replace(out, new_text="hi", finished=True, finish_reason="stop")
    assert type(new) is RequestOutput and new is not out
    assert (out.new_text, out.finished, out.finish_reason) == ("", False, None)
    with pytest.raises(TypeError, match=r"no field\(s\) \['text'\]"):
        out.evolve(text="hi")


@pytest.mark.anyio
async def test_a_mailbox_stream_idle_for_its_timeout_raises_and_cancels_its_call():
    from api.mailbox_call import mailbox_call

    handle, reader = FakeDeployment(), FakeReader()
    stream = mailbox_call(handle.run.remote, reader, [1], GREEDY, "idle", timeout_s=0.05)
    with pytest.raises(TimeoutError, match="no output from the serving replica"):
        await anext(stream)
    assert handle.responses[0].cancelled and "idle" not in reader.queues


@pytest.mark.anyio
async def test_the_idle_timer_counts_from_the_last_progress_and_spares_a_slow_consumer():
    """Driven by hand (`fire` at chosen `last` values), so no wall-clock bound is asserted."""
    from api.mailbox_call import IdleTimer

    queue: asyncio.Queue = asyncio.Queue()
    timer = IdleTimer(queue, timeout_s=60)
    now = timer.loop.time()
    timer.last = now - 59  # progress 59 s ago: re-armed for the remaining second
    timer.fire()
    assert queue.empty() and timer._handle.when() == pytest.approx(now + 1, abs=0.5)
    timer.last = now - 61
    queue.put_nowait("an output the consumer has not taken yet")
    timer.fire()  # waiting outputs count as progress: the replica is not idle
    assert queue.qsize() == 1 and timer.last >= now
    queue.get_nowait()
    timer.last = now - 61
    timer.fire()
    assert isinstance(queue.get_nowait(), TimeoutError)
    timer.cancel()

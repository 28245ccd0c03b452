"""Many requests a Serve call (`submit_batch`): the ingress's SubmitBatcher
(serving/batched_submit.py), the replica's BatchedRuns (serving/batched_runs.py) and the aborts
that travel back over the token socket (serving/token_socket.py). The Serve handle and the
replica's requests are played by the tests."""

from __future__ import annotations

import asyncio

import pytest

from engine.metrics import Metrics
from engine.sampling_params import SamplingParams
from serving.batched_runs import BatchedRuns
from serving.batched_submit import SubmitBatcher
from serving.token_socket import SocketReader, SocketSink, TokenSocket

GREEDY = SamplingParams(temperature=0.0, max_tokens=4)


class FakeCall:
    """A `run_many` stream the test drives: `accept()`, `end(...)`, `fail(e)`."""

    def __init__(self, requests: list[tuple]) -> None:
        self.requests = requests
        self.items: asyncio.Queue = asyncio.Queue()

    @property
    def ids(self) -> list[str]:
        return [r[2] for r in self.requests]

    def accept(self) -> None:
        self.items.put_nowait(len(self.requests))

    def end(self, *ends: tuple[str, tuple[str, str] | None]) -> None:
        """Requests that ended with no value (a `run_many` call's)."""
        self.items.put_nowait([(*end, None) for end in ends])

    def end_with(self, *ends: tuple[str, tuple[str, str] | None, object]) -> None:
        self.items.put_nowait(list(ends))

    def fail(self, e: BaseException) -> None:
        self.items.put_nowait(e)

    def finish(self) -> None:
        self.items.put_nowait(StopAsyncIteration())

    def __aiter__(self):
        return self

    async def __anext__(self):
        item = await self.items.get()
        if isinstance(item, BaseException):
            raise item
        return item


class FakeHandle:
    def __init__(self) -> None:
        self.calls: list[FakeCall] = []
        self.run_many = self.prefill_many = self

    def options(self, stream: bool) -> FakeHandle:
        assert stream
        return self

    def remote(self, requests: list[tuple], mailbox: object) -> FakeCall:
        assert mailbox is FakeReader.mailbox
        self.calls.append(FakeCall(requests))
        return self.calls[-1]


class FakeReader:
    mailbox = TokenSocket("the-socket", "127.0.0.1", 1, b"")

    def __init__(self) -> None:
        self.aborted: list[str] = []
        self.started = 0

    def start(self) -> None:
        self.started += 1

    def abort(self, request_ids) -> None:
        self.aborted += list(request_ids)


async def _result(response) -> object:
    """The response's outcome; a hang guard, not a timing bound."""
    return await asyncio.wait_for(asyncio.ensure_future(response), 30)


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.mark.anyio
async def test_a_burst_goes_as_one_call_after_the_first_is_accepted_and_splits_at_max_batch():
    handle, reader = FakeHandle(), FakeReader()
    batcher = SubmitBatcher(handle, reader, max_batch=3, max_hold_s=60)  # the hold never fires here
    first = batcher.run([1], GREEDY, "r0", reader.mailbox)
    rest = [batcher.run([i], GREEDY, f"r{i}", reader.mailbox) for i in range(1, 6)]
    await _settle()
    assert [c.ids for c in handle.calls] == [["r0"]]  # the others wait for its acceptance
    handle.calls[0].accept()
    await _settle()
    assert [c.ids for c in handle.calls] == [["r0"], ["r1", "r2", "r3"], ["r4", "r5"]]
    assert handle.calls[1].requests[0] == ([1], GREEDY, "r1")
    handle.calls[0].end(("r0", None))
    await _settle()
    assert first.future.done() and first.future.result() is None
    assert not any(r.future.done() for r in rest) and batcher.num_calls == 3


@pytest.mark.anyio
async def test_a_prefill_batcher_calls_its_method_and_each_request_gets_its_value():
    """A decode replica's batcher (`prefill_many`): requests keep their last argument (the
    first block), each future ends with the value its request's run returned, and the reader
    is started so that the prefill replicas' connections for aborts are accepted."""
    handle, reader = FakeHandle(), FakeReader()
    batcher = SubmitBatcher(handle, reader, max_batch=8, max_hold_s=60, method="prefill_many")
    a = batcher.run([1, 2], GREEDY, "a", 0)
    b = batcher.run([1, 2, 3], GREEDY, "b", 1)
    await _settle()
    handle.calls[0].accept()
    await _settle()
    assert [c.requests for c in handle.calls] == [[([1, 2], GREEDY, "a", 0)],
                                                  [([1, 2, 3], GREEDY, "b", 1)]]
    assert reader.started == 2  # once per send: a no-op while it runs
    handle.calls[1].accept()
    handle.calls[1].end_with(("b", None, "b's result"))
    handle.calls[0].end_with(("a", None, "a's result"))
    assert (await _result(a), await _result(b)) == ("a's result", "b's result")


@pytest.mark.anyio
async def test_a_value_that_comes_after_its_caller_left_goes_to_unclaimed():
    """A prefill that ended before its abort reached the replica: the answer comes for a
    request nobody waits for, and goes to `unclaimed` (which gives its KV back); an error or a
    run's None does not."""
    handle, reader, unclaimed = FakeHandle(), FakeReader(), []
    batcher = SubmitBatcher(handle, reader, max_batch=8, max_hold_s=60, method="prefill_many",
                            unclaimed=unclaimed.append)
    left = [batcher.run([1], GREEDY, rid, 0) for rid in ("late", "failed", "none")]
    await _settle()
    handle.calls[0].accept()
    await _settle()
    handle.calls[1].accept()
    await _settle()
    for response in left:
        response.cancel()
    assert reader.aborted == ["late", "failed", "none"]
    handle.calls[0].end_with(("late", None, "an answer"))
    handle.calls[1].end_with(("failed", ("RuntimeError", "the request was aborted"), None),
                             ("none", None, None))
    await _settle()
    assert unclaimed == ["an answer"]


@pytest.mark.anyio
async def test_requests_behind_a_call_that_is_never_accepted_go_after_the_hold():
    handle, reader = FakeHandle(), FakeReader()
    batcher = SubmitBatcher(handle, reader, max_batch=8, max_hold_s=0.01)
    batcher.run([1], GREEDY, "stuck", reader.mailbox)  # Serve holds this call back
    batcher.run([2], GREEDY, "held", reader.mailbox)
    await _settle()
    assert [c.ids for c in handle.calls] == [["stuck"]]
    for _ in range(3000):  # a hang guard, not a timing bound: the hold is 10 ms
        if len(handle.calls) == 2:
            break
        await asyncio.sleep(0.01)
    assert [c.ids for c in handle.calls] == [["stuck"], ["held"]]
    handle.calls[0].accept()  # the late acceptance sends nothing more
    await _settle()
    assert len(handle.calls) == 2 and batcher._hold is None


@pytest.mark.anyio
async def test_each_request_ends_with_its_own_error_and_a_failed_call_fails_the_rest():
    handle, reader = FakeHandle(), FakeReader()
    batcher = SubmitBatcher(handle, reader, max_batch=8, max_hold_s=60)
    a = batcher.run([1], GREEDY, "a", reader.mailbox)
    await _settle()
    handle.calls[0].accept()
    await _settle()
    b, c, d = (batcher.run([1], GREEDY, rid, reader.mailbox) for rid in "bcd")
    await _settle()
    handle.calls[1].accept()  # b went alone; c and d follow together
    await _settle()
    call = handle.calls[2]
    assert [c.ids for c in handle.calls] == [["a"], ["b"], ["c", "d"]]
    call.accept()
    handle.calls[1].end(("b", ("ValueError", "the prompt is empty")))
    call.end(("c", ("RuntimeError", "aborted")))
    await _settle()
    with pytest.raises(ValueError, match="prompt is empty"):
        await _result(b)
    with pytest.raises(RuntimeError, match="aborted"):
        await _result(c)
    died = ConnectionError("the replica died")
    call.fail(died)
    with pytest.raises(ConnectionError, match="died"):
        await _result(d)
    assert not a.future.done()  # another call's request
    handle.calls[0].finish()  # a call that ends before its requests did fails them
    with pytest.raises(RuntimeError, match="ended before request a"):
        await _result(a)


@pytest.mark.anyio
async def test_a_cancelled_request_is_dropped_unsent_or_aborted_once_its_call_is_accepted():
    handle, reader = FakeHandle(), FakeReader()
    batcher = SubmitBatcher(handle, reader, max_batch=8, max_hold_s=60)
    batcher.run([1], GREEDY, "sent", reader.mailbox).cancel()  # sent, not yet accepted
    await _settle()
    queued = batcher.run([1], GREEDY, "queued", reader.mailbox)
    kept = batcher.run([1], GREEDY, "kept", reader.mailbox)
    queued.cancel()
    await _settle()
    assert reader.aborted == [] and queued.future.cancelled()
    handle.calls[0].accept()  # now the abort cannot overtake the request
    await _settle()
    assert reader.aborted == ["sent"]
    assert [c.ids for c in handle.calls] == [["sent"], ["kept"]]
    handle.calls[1].accept()
    await _settle()
    kept.cancel()
    assert reader.aborted == ["sent", "kept"]
    handle.calls[1].end(("kept", ("RuntimeError", "the request was aborted")))
    await _settle()
    assert kept.future.cancelled()
    batcher.run([1], GREEDY, "sent", reader.mailbox)  # its id is free again
    with pytest.raises(ValueError, match="already running"):
        batcher.run([1], GREEDY, "sent", reader.mailbox)


@pytest.mark.anyio
async def test_the_replica_runs_each_request_reports_its_end_and_cancels_the_aborted():
    runs = BatchedRuns()
    release: dict[str, asyncio.Future] = {}

    async def run(request: tuple) -> object:
        release[request[2]] = asyncio.get_running_loop().create_future()
        return await release[request[2]]  # its value goes back with its end

    requests = [([1], GREEDY, rid) for rid in ("ok", "bad", "gone", "left")]
    stream = runs.run_many(requests, run)
    assert await anext(stream) == 4
    await _settle()
    assert sorted(release) == sorted(runs.tasks) == ["bad", "gone", "left", "ok"]
    release["ok"].set_result("ok's value")
    release["bad"].set_exception(ValueError("prompt too long"))
    assert sorted(await anext(stream)) == [("bad", ("ValueError", "prompt too long"), None),
                                           ("ok", None, "ok's value")]
    runs.abort("gone")
    runs.abort("not-here")  # another replica's request: ignored
    assert await anext(stream) == [("gone", ("RuntimeError", "the request was aborted"), None)]
    assert list(runs.tasks) == ["left"]
    left = runs.tasks["left"]
    await stream.aclose()  # the call was cancelled: its open requests go with it
    await _settle()
    assert left.cancelled() and runs.tasks == {}


@pytest.mark.anyio
async def test_a_duplicate_request_id_is_refused_without_touching_the_running_one():
    runs = BatchedRuns()
    hold = asyncio.get_running_loop().create_future()

    async def run(request: tuple) -> None:
        await hold

    first = runs.run_many([([1], GREEDY, "x")], run)
    assert await anext(first) == 1
    second = runs.run_many([([1], GREEDY, "x")], run)
    assert await anext(second) == 1
    assert await anext(second) == [("x", ("ValueError", "request id 'x' is already running"),
                                    None)]
    running = runs.tasks["x"]
    await second.aclose()
    assert not running.done()
    hold.set_result(None)
    assert await anext(first) == [("x", None, None)]


@pytest.mark.anyio
async def test_aborts_reach_the_replica_over_the_token_socket_and_a_late_connection_gets_them():
    reader = SocketReader(host="127.0.0.1")
    reader.open("r")
    loop = asyncio.get_running_loop()
    got: asyncio.Queue = asyncio.Queue()
    sink = await asyncio.to_thread(SocketSink, reader.mailbox, Metrics("colocated", "a"),
                                   lambda ids: None, on_abort=got.put_nowait, loop=loop)
    try:
        while reader.num_connections < 1:  # the reader registers the connection on its loop
            await asyncio.sleep(0.01)
        reader.abort(["r", "ünïcode id"])
        assert [await asyncio.wait_for(got.get(), 10) for _ in range(2)] == ["r", "ünïcode id"]
        late: asyncio.Queue = asyncio.Queue()
        other = await asyncio.to_thread(SocketSink, reader.mailbox, Metrics("colocated", "b"),
                                        lambda ids: None, on_abort=late.put_nowait, loop=loop)
        assert [await asyncio.wait_for(late.get(), 10) for _ in range(2)] == ["r", "ünïcode id"]
        other._sock.close()
    finally:
        sink._sock.close()
        reader.shutdown()

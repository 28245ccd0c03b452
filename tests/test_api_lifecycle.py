"""Requests end when their client goes: a disconnect mid-stream or mid-wait aborts the request
and frees its pages; the Serve handle adapter cancels the call when its consumer stops early and
turns a replica's ValueError back into a ValueError."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

import pytest
from starlette.requests import ClientDisconnect

from api.handle_client import HandleClient
from api.server import build_api
from engine.async_engine import AsyncEngine
from engine.llm import LLM
from engine.outputs import RequestOutput
from engine.request import Request
from engine.sampling_params import SamplingParams

pytestmark = pytest.mark.anyio
LONG = {"prompt": "Once upon a time", "max_tokens": 1000, "ignore_eos": True, "temperature": 0}


async def call_asgi(app, path: str, body: dict, spec: str, disconnect_after: int | None,
                    disconnect_when: Callable[[], bool] | None = None) -> list[dict]:
    """Runs one POST against the ASGI app. The client disconnects after `disconnect_after`
    body chunks (streaming) or once `disconnect_when()` holds (polled)."""
    sent: list[dict] = []
    gone = asyncio.Event()
    request = {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
    messages = [request]

    async def receive() -> dict:
        if messages:
            return messages.pop()
        if disconnect_when is not None:
            while not disconnect_when():
                await asyncio.sleep(0.001)
            gone.set()
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if gone.is_set():
            raise OSError("client went away")  # what an ASGI 2.4 server does
        sent.append(message)
        chunks = [m for m in sent if m["type"] == "http.response.body" and m.get("body")]
        if disconnect_after is not None and len(chunks) >= disconnect_after:
            gone.set()

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": spec},
             "http_version": "1.1", "method": "POST", "scheme": "http", "path": path,
             "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"host", b"test")],
             "client": ("127.0.0.1", 1234), "server": ("test", 80)}
    try:
        # A hang guard only: every call here ends at the disconnect, within a few steps.
        await asyncio.wait_for(app(scope, receive, send), timeout=60)
    except (OSError, ClientDisconnect):  # how Starlette reports a vanished client
        pass
    return sent


@pytest.fixture
def admitted(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> list[Request]:
    """The engine's requests, in the order they reach its scheduler (kept after they end)."""
    seen: list[Request] = []
    add = llm.engine.scheduler.add

    def record(req: Request) -> None:
        seen.append(req)
        add(req)

    monkeypatch.setattr(llm.engine.scheduler, "add", record)
    return seen


async def settle(llm: LLM, engine: AsyncEngine) -> None:
    """Waits until the engine has no request and no open stream left. The deadline is a hang
    guard only; what ended the requests is for the caller to check (`assert_aborted`)."""
    deadline = asyncio.get_running_loop().time() + 60
    while llm.engine.has_unfinished() or engine.num_open_streams():
        assert asyncio.get_running_loop().time() < deadline, "the requests never ended"
        await asyncio.sleep(0.01)


async def assert_aborted(llm: LLM, engine: AsyncEngine, requests: list[Request],
                         max_tokens: int) -> None:
    """Each request was aborted part-way (it did not run to `max_tokens`), its pages are free,
    and the engine does no more work: its step counter stands still."""
    await settle(llm, engine)
    assert requests
    for req in requests:
        assert req.finish_reason == "abort"
        assert 0 < len(req.output_token_ids) < max_tokens
    assert not llm.engine.has_unfinished() and engine.num_open_streams() == 0
    llm.engine.allocator.check_integrity()
    assert llm.engine.num_pages_used == 0
    steps = engine.stepper.num_steps
    await asyncio.sleep(0.1)
    assert engine.stepper.num_steps == steps


@pytest.mark.parametrize("spec", ["2.0", "2.4"])  # Starlette watches disconnects only < 2.4
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions",
                                  "/generate_stream"])
async def test_stream_disconnect_aborts(llm: LLM, admitted: list[Request], spec: str,
                                        path: str) -> None:
    engine = AsyncEngine(llm.engine)
    app = build_api(engine, llm.tokenizer, "tiny", 2048)
    body = {**LONG, "stream": True}
    if path == "/v1/chat/completions":
        body = {**body, "messages": [{"role": "user", "content": "hi"}]}
    if path == "/generate_stream":
        body = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 1000}}
    sent = await call_asgi(app, path, body, spec, disconnect_after=3)
    assert sent[0]["status"] == 200
    await assert_aborted(llm, engine, admitted, max_tokens=1000)
    engine.close()


async def test_non_streaming_disconnect_aborts(llm: LLM, admitted: list[Request]) -> None:
    engine = AsyncEngine(llm.engine)
    app = build_api(engine, llm.tokenizer, "tiny", 2048)

    def five_tokens_out() -> bool:  # the client goes while its request is generating
        return bool(admitted) and len(admitted[0].output_token_ids) >= 5

    sent = await call_asgi(app, "/v1/completions", LONG, "2.4", None, five_tokens_out)
    assert sent == []  # nothing was answered: the client was gone
    await assert_aborted(llm, engine, admitted, max_tokens=LONG["max_tokens"])
    assert len(admitted) == 1 and len(admitted[0].output_token_ids) >= 5
    engine.close()


async def test_batched_stream_disconnect_aborts_all(llm: LLM, admitted: list[Request]) -> None:
    engine = AsyncEngine(llm.engine)
    app = build_api(engine, llm.tokenizer, "tiny", 2048)
    body = {**LONG, "prompt": ["Once upon a time", "The cat"], "stream": True}
    await call_asgi(app, "/v1/completions", body, "2.0", disconnect_after=4)
    await assert_aborted(llm, engine, admitted, max_tokens=LONG["max_tokens"])
    assert len(admitted) == 2
    engine.close()


# -- the Serve handle adapter, against a stand-in for DeploymentHandle ----------------------
class FakeResponse:
    """Stands in for DeploymentResponseGenerator: async-iterable, cancellable."""

    def __init__(self, outputs: list[RequestOutput], error: BaseException | None) -> None:
        self._outputs, self._error, self.cancelled = list(outputs), error, False

    def __aiter__(self) -> FakeResponse:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._outputs:
            return self._outputs.pop(0)
        if self._error is not None:
            raise self._error
        raise StopAsyncIteration

    def cancel(self) -> None:
        self.cancelled = True


class FakeHandle:
    def __init__(self, outputs: list[RequestOutput], error: BaseException | None = None):
        self.outputs, self.error = outputs, error
        self.calls: list[tuple] = []
        self.responses: list[FakeResponse] = []
        self.streaming = False

    def options(self, stream: bool = False) -> FakeHandle:
        self.streaming = stream
        return self

    @property
    def generate(self) -> FakeHandle:
        return self

    def remote(self, *args) -> FakeResponse:
        self.calls.append(args)
        self.responses.append(FakeResponse(self.outputs, self.error))
        return self.responses[-1]


class RayTaskErrorLike(Exception):
    """Like ray.exceptions.RayTaskError: the replica's exception rides in `.cause`."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"Traceback (most recent call last): ... {cause!r}")
        self.cause = cause


def outputs(n: int) -> list[RequestOutput]:
    return [RequestOutput("r", [i], f"t{i}", i == n - 1, "length" if i == n - 1 else None)
            for i in range(n)]


async def test_handle_client_streams_and_cancels() -> None:
    handle = FakeHandle(outputs(3))
    client = HandleClient(handle)
    params = SamplingParams(max_tokens=3)
    got = [o.new_text async for o in client.generate([1, 2], params, "r")]
    assert got == ["t0", "t1", "t2"] and handle.streaming
    assert handle.calls == [([1, 2], params, "r")]
    assert not handle.responses[0].cancelled  # finished normally: nothing to cancel

    stream = client.generate([1, 2], params, "r2")
    assert (await anext(stream)).new_text == "t0"
    await stream.aclose()  # the HTTP client went away
    assert handle.responses[1].cancelled


async def test_handle_client_maps_errors() -> None:
    refused = HandleClient(FakeHandle([], RayTaskErrorLike(ValueError("prompt too long"))))
    with pytest.raises(ValueError, match="^prompt too long$"):
        await anext(refused.generate([1], SamplingParams(), "r"))
    handle = FakeHandle([], RayTaskErrorLike(RuntimeError("boom")))
    with pytest.raises(RayTaskErrorLike):
        await anext(HandleClient(handle).generate([1], SamplingParams(), "r"))
    assert handle.responses[0].cancelled

    got_one = asyncio.Event()

    async def consume(stream: AsyncIterator[RequestOutput]) -> None:
        async with aclosing(stream):  # as the API consumes every stream
            async for _ in stream:
                got_one.set()
                await asyncio.sleep(10)

    handle = FakeHandle(outputs(5))
    task = asyncio.create_task(consume(HandleClient(handle).generate([1], SamplingParams(), "r")))
    await got_one.wait()  # the call is under way, its consumer mid-stream
    task.cancel()  # what Serve does to the handler when the HTTP client disconnects
    await asyncio.gather(task, return_exceptions=True)
    await asyncio.sleep(0)
    assert handle.responses[0].cancelled

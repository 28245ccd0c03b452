"""A client that disconnects is a normal event: behind Serve, `receive()` raises the proxy's
TaskCancelledError once the client has gone. Mid-stream (Starlette's disconnect listener) or
while a body is still being read, the request ends quietly: nothing propagates out of the app
for Serve to log, no error record, no unretrieved exception, and the pages come back."""

from __future__ import annotations

import asyncio
import gc
import json
import logging

import pytest
from ray.exceptions import TaskCancelledError

from api.server import build_api
from engine.async_engine import AsyncEngine
from engine.llm import LLM

pytestmark = pytest.mark.anyio
BODIES = {
    "/v1/completions": {"prompt": "Once upon a time", "max_tokens": 500, "ignore_eos": True,
                        "stream": True},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}],
                             "max_tokens": 500, "ignore_eos": True, "stream": True},
    "/generate_stream": {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 500}},
    "/generate": {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 500}},
}


def scope(path: str, spec: str) -> dict:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": spec},
            "http_version": "1.1", "method": "POST", "scheme": "http", "path": path,
            "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "headers": [(b"content-type", b"application/json"), (b"host", b"test")],
            "client": ("127.0.0.1", 1234), "server": ("test", 80)}


@pytest.mark.parametrize("spec", ["2.0", "2.4"])
@pytest.mark.parametrize("path", sorted(BODIES))
@pytest.mark.parametrize("when", ["after-first-chunk", "while-reading-body"])
async def test_serve_disconnect_is_quiet(llm: LLM, caplog, path: str, spec: str,
                                         when: str) -> None:
    caplog.set_level(logging.DEBUG)
    engine = AsyncEngine(llm.engine)
    app = build_api(engine, llm.tokenizer, "tiny", 2048)
    body = json.dumps(BODIES[path]).encode()
    first_chunk = asyncio.Event()
    sent: list[dict] = []
    calls = 0

    async def receive() -> dict:
        nonlocal calls
        calls += 1
        if when == "while-reading-body":
            if calls == 1:
                return {"type": "http.request", "body": body[:5], "more_body": True}
            raise TaskCancelledError()
        if calls == 1:
            return {"type": "http.request", "body": body, "more_body": False}
        if path == "/generate":  # unary: gone while the request runs
            await asyncio.sleep(0.05)
        else:
            await first_chunk.wait()
        raise TaskCancelledError()  # what Serve's ASGIReceiveProxy raises once cancelled

    async def send(message: dict) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            first_chunk.set()
        if spec == "2.4" and first_chunk.is_set():  # no listener at 2.4: the write fails
            raise TaskCancelledError()

    # Returns normally: nothing left for Serve to log. (A hang guard only.)
    await asyncio.wait_for(app(scope(path, spec), receive, send), timeout=60)
    while llm.engine.has_unfinished() or engine.num_open_streams():
        await asyncio.sleep(0.01)
    engine.close()
    gc.collect()  # an unretrieved exception is reported when its future is collected
    await asyncio.sleep(0)
    assert llm.engine.num_pages_used == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert "Traceback" not in caplog.text and "never retrieved" not in caplog.text

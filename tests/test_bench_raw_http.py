"""bench.raw_http: the burst client keeps one connection, sends what it was given, reads whole
answers, and opens a new connection after `Connection: close`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import pytest

from bench.raw_http import RawConnection, post_json_request


class OneShotServer:
    """Answers each request with the next of `answers` (raw header bytes, a body); records the
    requests it read and how many connections it accepted."""

    def __init__(self, answers: list[tuple[bytes, bytes]]) -> None:
        self.answers = answers
        self.requests: list[tuple[bytes, bytes]] = []
        self.connections = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self._answer(reader, writer)
        except asyncio.IncompleteReadError:  # the client closed its connection
            pass
        finally:
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            self.requests.append((head, await reader.readexactly(length)))
            headers, body = self.answers.pop(0)
            writer.write(headers + body)
            await writer.drain()
            if b"Connection: close" in headers:
                return


def answer(status: str, body: bytes, extra: str = "", length: bool = True) -> tuple[bytes, bytes]:
    head = f"HTTP/1.1 {status}\r\nRetry-After: 1\r\n{extra}"
    if length:
        head += f"Content-Length: {len(body)}\r\n"
    return (head + "\r\n").encode(), body


async def serve(server: OneShotServer, make_request: Callable[[str], bytes],
                count: int) -> tuple[list, str]:
    """Sends `count` requests made by `make_request(base_url)` through one RawConnection;
    returns the answers and the base URL."""
    srv = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    conn = RawConnection(base)
    try:
        request = make_request(base)
        return [await conn.send(request) for _ in range(count)], base
    finally:
        await conn.close()
        srv.close()
        await srv.wait_closed()


def test_keeps_one_connection_and_reads_whole_answers() -> None:
    server = OneShotServer([answer("429 Too Many Requests", b'{"error":"overloaded"}'),
                            answer("200 OK", b"ok")])
    body = {"prompt": "Hello", "max_tokens": 4}
    req = lambda base: post_json_request(base, "/v1/completions", body)  # noqa: E731
    (first, second), base = asyncio.run(serve(server, req, 2))
    assert first == (429, {"retry-after": "1", "content-length": "22"},
                     b'{"error":"overloaded"}')
    assert second == (200, {"retry-after": "1", "content-length": "2"}, b"ok")
    assert server.connections == 1
    head, sent = server.requests[0]
    assert head.startswith(b"POST /v1/completions HTTP/1.1\r\n")
    assert f"Host: {base.removeprefix('http://')}".encode() in head
    assert json.loads(sent) == body


def test_reconnects_after_connection_close() -> None:
    server = OneShotServer([answer("429 Too Many Requests", b"x", "Connection: close\r\n"),
                            answer("429 Too Many Requests", b"y")])
    req = lambda base: post_json_request(base, "/generate", {"inputs": "a"})  # noqa: E731
    (first, second), _ = asyncio.run(serve(server, req, 2))
    assert (first[0], first[2], second[0], second[2]) == (429, b"x", 429, b"y")
    assert server.connections == 2


def test_refuses_answers_it_cannot_delimit() -> None:
    server = OneShotServer([answer("200 OK", b"", "Transfer-Encoding: chunked\r\n",
                                   length=False)])
    req = lambda base: post_json_request(base, "/v1/completions", {})  # noqa: E731
    with pytest.raises(ValueError, match="without Content-Length"):
        asyncio.run(serve(server, req, 1))
    with pytest.raises(ValueError, match="plain http only"):
        RawConnection("https://127.0.0.1:8000")

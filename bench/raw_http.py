"""A minimal HTTP/1.1 client for bursts of small requests: one kept-alive connection each.

`bench.overload` times 429 answers on a machine whose two cores the server shares with the
load generator. There aiohttp's own work per request (a session's request object, its
connector's bookkeeping, the response's parser) was a measurable part of what a burst timed:
the first burst on new connections came back in 50-74 ms through aiohttp against 18-32 ms
through this client, alternated on one server (docs/cpu-benchmarks.md, 2026-12-03). This
client writes a prepared request and reads the status line, the headers and a
`Content-Length` body; nothing else (no chunked bodies, no redirects, no TLS).
"""

from __future__ import annotations

import asyncio
import json
from urllib.parse import urlsplit


def post_json_request(base_url: str, path: str, body: dict) -> bytes:
    """The bytes of one keep-alive `POST path` with a JSON body."""
    host = urlsplit(base_url).netloc
    payload = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n")
    return head.encode("ascii") + payload


class RawConnection:
    """One TCP connection to `base_url`, opened on first use and kept for the next requests."""

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http":
            raise ValueError(f"plain http only, not {base_url}")
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def send(self, request: bytes) -> tuple[int, dict[str, str], bytes]:
        """Send a prepared request; returns (status, headers with lower-case names, body)."""
        if self._streams is None:
            self._streams = await asyncio.open_connection(self.host, self.port)
        reader, writer = self._streams
        writer.write(request)
        await writer.drain()
        status_line = await reader.readline()
        if not status_line:
            await self.close()
            raise ConnectionError("the server closed the connection before answering")
        status = int(status_line.split()[1])
        headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" not in headers:
            await self.close()
            raise ValueError(f"HTTP {status} without Content-Length (headers: {headers})")
        body = await reader.readexactly(int(headers["content-length"]))
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, headers, body

    async def close(self) -> None:
        if self._streams is not None:
            writer = self._streams[1]
            self._streams = None
            writer.close()
            try:
                await writer.wait_closed()
            except ConnectionError:
                pass

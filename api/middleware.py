"""Plain ASGI middlewares (streaming responses pass through untouched).

- `RequestId`: every request gets an id: the client's `X-Request-Id` when it is a sane token,
  else a fresh one, readable through `scope["state"]`. Standalone,
  the id is echoed in the response header and logged with each request's line. Behind Serve,
  the proxy already does both (its RequestIdMiddleware sets the header, the replica's access
  log carries the id, and the id reaches the downstream replicas' log records), so the app
  only takes the id the proxy put in the request headers. It is also where a client that went
  away ends: the error that says so (ClientDisconnect, Serve's TaskCancelledError from
  `receive()`) stops here as a normal end, status 499, instead of reaching Serve, which would
  log it with a traceback.
- `BodyLimit`: a request body larger than `max_bytes` gets a 413 in its route family's error
  shape before any of it is parsed.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import APIError, client_gone, error_response, route_path
from engine.hop_log import hop

log = logging.getLogger("pdserve.api")

HEADER = "x-request-id"
_SANE = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
_QUIET = ("/health", "/metrics")  # polled: no log line


def _header(scope: Scope, name: str) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.decode("latin-1").lower() == name:
            return value.decode("latin-1")
    return None


class RequestId:
    def __init__(self, app: ASGIApp, standalone: bool = True) -> None:
        self.app, self.standalone = app, standalone

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = _header(scope, HEADER)
        rid = given if given and _SANE.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        if scope["method"] == "POST":  # under this id, not the engine's (bench/hop_report.py)
            hop(rid, "ingress.http")
        status, start = 500, time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if self.standalone:
                    message = {**message, "headers": [*message.get("headers", ()),
                                                      (HEADER.encode(), rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as e:
            if not client_gone(e):
                raise
            status = 499  # nobody to answer: the request simply ends
        finally:
            if self.standalone and route_path(scope) not in _QUIET:
                log.info("request_id=%s %s %s -> %d in %.3f s", rid, scope["method"],
                         scope["path"], status, time.perf_counter() - start)


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = _header(scope, "content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(scope, receive, send)
            return
        # Read the body here (bounded), then hand it on: FastAPI would turn a failure while it
        # reads the body itself into a 400.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # gone before the body arrived
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay() -> Message:
            nonlocal body
            if body is not None:
                message, body = body, None
                return message
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        err = APIError(f"the request body is larger than {self.max_bytes} bytes", status=413)
        await error_response(err, route_path(scope))(scope, receive, send)

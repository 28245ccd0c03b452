"""Counts HTTP requests per route and status, as the API's own metrics snapshot.

A plain ASGI middleware (not BaseHTTPMiddleware) so streaming responses pass through untouched.
Paths that match no route are counted under "other", which keeps label cardinality bounded.
"""

from __future__ import annotations

import os
import socket
from collections import Counter
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class RequestStats:
    def __init__(self, app: ASGIApp, counts: Counter) -> None:
        self.app, self.counts = app, counts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # unless a response starts

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "other"
            self.counts[(path, str(status))] += 1


def replica_name() -> str:
    return f"api-{socket.gethostname()}-{os.getpid()}"


def snapshot(counts: Counter, replica: str, source_up: bool | None) -> dict[str, Any]:
    gauges: dict[str, Any] = {}
    if source_up is not None:
        gauges["pdserve_metrics_source_up"] = int(source_up)
    series = [({"route": r, "status": s}, n) for (r, s), n in sorted(counts.items())]
    return {"role": "api", "replica": replica, "gauges": gauges,
            "counters": {"pdserve_http_requests_total": series} if series else {}}

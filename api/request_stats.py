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

from api.errors import client_gone


class RequestStats:
    def __init__(self, app: ASGIApp, counts: Counter) -> None:
        self.app, self.counts = app, counts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status: int | None = None

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception as e:
            status = status or (499 if client_gone(e) else 500)
            raise
        finally:
            # No response and no crash: the request was cancelled because its client went
            # away before the first byte; counted as nginx's 499 "client closed request".
            status = status or 499
            route = scope.get("route")
            path = getattr(route, "path", None) or "other"
            self.counts[(path, str(status))] += 1


def replica_name() -> str:
    return f"api-{socket.gethostname()}-{os.getpid()}"


def snapshot(counts: Counter, replica: str, source_up: bool | None,
             admission: Any = None, resumed: int | None = None,
             unauthorized: int | None = None) -> dict[str, Any]:
    gauges: dict[str, Any] = {}
    if source_up is not None:
        gauges["pdserve_metrics_source_up"] = int(source_up)
    if admission is not None:  # api.admission.Admission
        gauges["pdserve_api_active_requests"] = admission.active
        gauges["pdserve_api_queued_requests"] = admission.num_waiting
        gauges["pdserve_api_prefill_tokens_admitted"] = admission.prefilling
    shared = getattr(admission, "shared", None)
    if shared is not None:  # the cluster-wide limit's ledger (fail open while it is away)
        gauges["pdserve_api_admission_ledger_up"] = int(shared.ledger_up)
    series = [({"route": r, "status": s}, n) for (r, s), n in sorted(counts.items())]
    counters: dict[str, Any] = {"pdserve_http_requests_total": series} if series else {}
    if admission is not None:  # 429s: answered before routing, so not in the series above
        counters["pdserve_api_rejected_requests_total"] = admission.num_rejected
    if shared is not None:
        counters["pdserve_api_admission_local_decisions_total"] = shared.num_fallbacks
    if resumed is not None:  # streams continued on another replica after theirs died
        counters["pdserve_api_resumed_requests_total"] = resumed
    if unauthorized is not None:  # 401s (API keys on): answered before routing too
        counters["pdserve_api_unauthorized_requests_total"] = unauthorized
    return {"role": "api", "replica": replica, "gauges": gauges, "counters": counters}

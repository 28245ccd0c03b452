"""build_api: the whole HTTP surface as one FastAPI app over a generation client.

OpenAI routes under /v1, TGI routes at the root, plus /health and /metrics. The app holds no
engine: `client.generate(prompt_ids, params, request_id)` is all it needs (an AsyncEngine in
tests, a Serve handle adapter in the cluster), so it runs the same in-process and behind Serve.
The client's outputs need carry only token ids: text and stop strings are derived here, by
DetokenizingClient (api/detokenizing_client.py), for every route. Every generation passes the
admission gates of `limits` (api/admission.py) on its way there.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import SecretStr

from api import prometheus, request_stats
from api.admission import Admission, AdmissionGate, AdmittedClient, SharedGate
from api.auth import ApiKeyAuth, ApiKeys
from api.context import GenerateClient, ServerContext
from api.detokenizing_client import DetokenizingClient
from api.errors import install_error_handlers
from api.middleware import BodyLimit, RequestId
from api.openapi import contract_openapi
from api.routes_openai import openai_router
from api.routes_tgi import tgi_router
from serving.limits import Limits

log = logging.getLogger(__name__)

MetricsSource = Callable[[], "list[dict[str, Any]] | Awaitable[list[dict[str, Any]]]"]
METRICS_TIMEOUT_S = 5.0


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


def _renewing(shared: SharedGate | None) -> Callable[[FastAPI], Any]:
    """The app's lifespan (Serve runs it in the replica): keeps the shared slots renewed."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(shared.run_renewals()) if shared is not None else None
        yield
        if task is not None:
            task.cancel()

    return lifespan


def build_api(client: GenerateClient, tokenizer: Any, model_name: str, max_model_len: int,
              metrics_source: MetricsSource | None = None,
              ready: Callable[[], bool | Awaitable[bool]] = lambda: True,
              limits: Limits | None = None, request_id_header: bool = True,
              detokenize: bool = True,
              api_keys: Sequence[str | SecretStr] | None = None,
              shared_slots: SharedGate | None = None) -> FastAPI:
    """`metrics_source()` (sync or async) returns per-replica snapshots for /metrics (see
    api/prometheus.py); `ready()` (sync or async) decides /health. `request_id_header=False`
    leaves the X-Request-Id response header and the access log to the Serve proxy in front.
    `detokenize=False` streams token ids without text (random weights sample ids the
    tokenizer may not know). `api_keys` (None: $PDSERVE_API_KEYS) turns on bearer-key
    auth for every route but /health (api/auth.py). `shared_slots` makes
    `max_concurrent_requests` hold across ingress replicas (serving/admission_ledger.py)."""
    limits = (limits or Limits()).resolved(max_model_len)
    admission = Admission(limits, shared_slots)
    keys = ApiKeys(api_keys)
    text = DetokenizingClient(client, tokenizer if detokenize else None)
    ctx = ServerContext(AdmittedClient(text, admission),
                        tokenizer, model_name, max_model_len, limits)
    app = FastAPI(title="pdserve", version="0.1.0", lifespan=_renewing(shared_slots))
    app.state.ctx, app.state.admission, app.state.keys = ctx, admission, keys
    install_error_handlers(app)
    counts: Counter = Counter()
    replica = request_stats.replica_name()
    app.add_middleware(request_stats.RequestStats, counts=counts)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    app.add_middleware(AdmissionGate, admission=admission)
    app.add_middleware(ApiKeyAuth, keys=keys)  # before admission: a 401 takes no slot
    app.add_middleware(RequestId, standalone=request_id_header)  # outermost: sees every answer
    app.include_router(openai_router(ctx))
    app.include_router(tgi_router(ctx))

    @app.get("/health")
    async def health() -> JSONResponse:
        try:
            ok = bool(await _maybe_await(ready()))
        except Exception:
            log.exception("readiness check failed")
            ok = False
        return JSONResponse({"status": "ok" if ok else "unavailable"},
                            status_code=200 if ok else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        snapshots: list[dict[str, Any]] = []
        up: bool | None = None
        if metrics_source is not None:
            try:
                result = await asyncio.wait_for(_maybe_await(metrics_source()),
                                                METRICS_TIMEOUT_S)
                snapshots, up = list(result), True
            except Exception:  # a scrape must still answer: report the source as down
                log.exception("metrics source failed")
                up = False
        snapshots.append(request_stats.snapshot(counts, replica, up, admission,
                                                getattr(client, "num_resumes", None),
                                                keys.num_refused if keys.enabled else None))
        return PlainTextResponse(prometheus.render(snapshots),
                                 media_type=prometheus.CONTENT_TYPE)

    contract_openapi(app, ctx, keys.enabled)
    return app

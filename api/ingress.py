"""Ingress: the Ray Serve deployment that serves the HTTP API (build_api) over a handle.

The FastAPI app is built per replica, after the constructor has loaded the tokenizer, through
Serve's late-bound ingress hook: `@serve.ingress()` with no app makes Serve call
`__serve_build_asgi_app__` once the replica is constructed and serve the app it returns.

Binding (cluster/app.py):

    serving = DecodeServer.bind(...)          # exposes `run(..., mailbox)` and `generate(...)`
    app = Ingress.bind(serving, model_path, model_name="tiny-llama", max_model_len=2048,
                       metrics_source=collect_snapshots, limits={...}, request_timeout_s=600,
                       stream_interval_ms=0, api_keys=cfg.api_keys)

Tokens come back through this replica's token socket (serving/token_socket.py; or its token
mailbox, serving/token_mailbox.py, with `token_path: mailbox`): one frame per engine step and
serving replica for all the streams of this replica.

`metrics_source` is a zero-argument callable returning a list of snapshot dicts or an awaitable
of one (see api/prometheus.py). It is pickled into the replica and called there, so it must not
capture DeploymentHandles built on the driver; look them up inside the call instead
(`serve.get_deployment_handle(name, app_name)`), or leave it None to serve only API metrics.

/health is ready when the serving deployment answers its own `health()` (the decode deployment
asks prefill in turn) within HEALTH_TIMEOUT_S.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ray import serve
from transformers import AutoTokenizer

from api.grpc_service import GrpcService
from api.handle_client import HandleClient
from api.mailbox_call import Coalescing
from api.server import MetricsSource, build_api
from serving.ledger_actor import replica_shared_slots
from serving.limits import Limits
from serving.token_path import make_reader

HEALTH_TIMEOUT_S = 5.0


@serve.deployment(max_ongoing_requests=1000)
@serve.ingress()
class Ingress(GrpcService):  # + gRPC Generate / GenerateStream (api/grpc_service.py)
    def __init__(self, handle: Any, model_path: str, model_name: str | None = None,
                 max_model_len: int = 2048, metrics_source: MetricsSource | None = None,
                 limits: dict | None = None, request_timeout_s: float = 600.0,
                 stream_interval_ms: float = 0.0, detokenize: bool = True,
                 token_path: str = "socket", api_keys: list[Any] | None = None,
                 submit_batch: int = 1) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=False)
        self.handle = handle
        # Token ids only ("socket" / "mailbox": one frame or message per engine step for every
        # stream of this replica); build_api detokenizes every stream, resumed ones included.
        self.client = HandleClient(handle, timeout_s=request_timeout_s,
                                   reader=make_reader(token_path),
                                   coalescing=Coalescing(stream_interval_ms / 1000),
                                   submit_batch=submit_batch)
        self.model_name = model_name or model_path
        self.max_model_len = max_model_len
        self.metrics_source = metrics_source
        self.limits = Limits(**(limits or {}))
        # One ledger for every ingress replica: max_concurrent_requests is cluster-wide.
        self.shared_slots = replica_shared_slots(self.limits.max_concurrent_requests)
        self.detokenize = detokenize
        # str or pydantic SecretStr (AppConfig.api_keys); None: $PDSERVE_API_KEYS, read here,
        # in the replica's environment (runtime_env env_vars reach it).
        self.api_keys = api_keys

    async def ready(self) -> bool:
        await asyncio.wait_for(self.handle.health.remote(), HEALTH_TIMEOUT_S)
        return True

    def __serve_build_asgi_app__(self) -> Any:
        asgi = build_api(self.client, self.tokenizer, self.model_name, self.max_model_len,
                         metrics_source=self.metrics_source, ready=self.ready,
                         limits=self.limits, request_id_header=False,
                         detokenize=self.detokenize, api_keys=self.api_keys,
                         shared_slots=self.shared_slots)
        return self.grpc_attach(asgi)  # gRPC shares its context, admission and keys

"""Ingress: the Ray Serve deployment that serves the HTTP API (build_api) over a handle.

The FastAPI app is built per replica, after the constructor has loaded the tokenizer, through
Serve's late-bound ingress hook: `@serve.ingress()` with no app makes Serve call
`__serve_build_asgi_app__` once the replica is constructed and serve the app it returns.

Binding (cluster/app.py):

    serving = DecodeServer.bind(...)          # exposes async-generator `generate(...)`
    app = Ingress.bind(serving, model_path, model_name="tiny-llama", max_model_len=2048,
                       metrics_source=collect_snapshots)

`metrics_source` is a zero-argument callable returning a list of snapshot dicts or an awaitable
of one (see api/prometheus.py). It is pickled into the replica and called there, so it must not
capture DeploymentHandles built on the driver; look them up inside the call instead
(`serve.get_deployment_handle(name, app_name)`), or leave it None to serve only API metrics.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from transformers import AutoTokenizer

from api.handle_client import HandleClient
from api.server import MetricsSource, build_api


@serve.deployment(max_ongoing_requests=1000)
@serve.ingress()
class Ingress:
    def __init__(self, handle: Any, model_path: str, model_name: str | None = None,
                 max_model_len: int = 2048, metrics_source: MetricsSource | None = None
                 ) -> None:
        self.client = HandleClient(handle)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=False)
        self.model_name = model_name or model_path
        self.max_model_len = max_model_len
        self.metrics_source = metrics_source

    def __serve_build_asgi_app__(self) -> Any:
        return build_api(self.client, self.tokenizer, self.model_name, self.max_model_len,
                         metrics_source=self.metrics_source)

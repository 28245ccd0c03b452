"""The SLO autoscaler end to end: a third application on the shared cluster, deployed from a
Serve config (the only way to name an application-level policy). Load above the decode SLO
takes decode from 1 to 2 replicas, and back to 1 once the load stops.

The SLO is set so that any load exceeds it (TPOT 0.1 ms) and prefill is pinned at 1 replica:
the test checks the wiring (replica reports -> controller -> policy -> replicas), not
the engine's speed. Deadlines are hang guards only.
"""

from __future__ import annotations

import asyncio
import threading
import time

import httpx

from tests.e2e.conftest import app_args

APP, ROUTE = "autoscale", "/autoscale"
HANG_GUARD_S = 300  # per wait; the whole test body takes ~45 s on 2 idle CPU cores


def _serve_config(model_dir: str) -> dict:
    args = app_args(model_dir, "disaggregated")
    args["slo"] = {"ttft_ms": 60_000, "tpot_ms": 0.1}
    args["autoscaler"] = {
        "enabled": True, "prefill": {"min_replicas": 1, "max_replicas": 1},
        "decode": {"min_replicas": 1, "max_replicas": 2},
        "upscale_after_s": 1, "downscale_after_s": 2, "cooldown_s": 3,
        "look_back_period_s": 3, "metrics_interval_s": 0.5}
    return {"applications": [{
        "name": APP, "route_prefix": ROUTE, "import_path": "cluster.app:build_app",
        "autoscaling_policy": {"policy_function": "cluster.slo_autoscaler:slo_policy"},
        "args": args}]}


def _running(role: str) -> int:
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None or role not in app.deployments:
        return 0
    return sum(n for state, n in app.deployments[role].replica_states.items()
               if str(state).endswith("RUNNING"))


def _healthy(base: str) -> bool:
    try:
        return _running("decode") > 0 and httpx.get(f"{base}/health").status_code == 200
    except httpx.HTTPError:
        return False


def _wait(what: str, check) -> None:
    deadline = time.time() + HANG_GUARD_S
    while not check():
        assert time.time() < deadline, f"gave up waiting for {what}"
        time.sleep(0.25)


class Load:
    """Streams that keep 4 requests generating until stopped."""

    def __init__(self, base: str) -> None:
        self.base, self.stop, self.done = base, threading.Event(), 0
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _one(self, client: httpx.AsyncClient, i: int) -> None:
        while not self.stop.is_set():
            body = {"prompt": list(range(10 + i, 30 + i)), "max_tokens": 64,
                    "ignore_eos": True, "stream": True, "temperature": 0}
            async with client.stream("POST", f"{self.base}/v1/completions", json=body) as r:
                assert r.status_code == 200
                async for _ in r.aiter_lines():
                    pass
            self.done += 1

    async def _main(self) -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            results = await asyncio.gather(*[self._one(client, i) for i in range(4)],
                                           return_exceptions=True)
        self.errors = [r for r in results if isinstance(r, BaseException)]


def test_decode_scales_up_under_load_and_back_down(cluster):
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    client = _get_global_client()
    client.deploy_apps(ServeDeploySchema.model_validate(_serve_config(cluster["model_dir"])))
    base = f"{cluster['base']}{ROUTE}"
    try:
        _wait("the app", lambda: _healthy(base))
        assert (_running("prefill"), _running("decode")) == (1, 1)
        load = Load(base)
        load.thread.start()
        try:
            _wait("a second decode replica", lambda: _running("decode") == 2)
        finally:
            load.stop.set()
            load.thread.join(timeout=60)
        assert not load.errors and load.done > 0 and _running("prefill") == 1
        _wait("decode back at 1 replica", lambda: _running("decode") == 1)
    finally:
        from ray import serve

        serve.delete(APP)  # its replicas leave /metrics (the pages-freed test reads it)


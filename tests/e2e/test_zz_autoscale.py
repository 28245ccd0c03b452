"""The SLO autoscaler end to end: applications of their own on the shared cluster, deployed
from a Serve config (the only way to name an application-level policy).

- load above the decode SLO takes decode from 1 to 2 replicas, and back to 1 once it stops;
- prompt-heavy load above the TTFT SLO takes prefill from 1 to 2 instead (decode stays at 1).

Each SLO is set so that any load of its kind exceeds it (TPOT 0.1 ms; TTFT 1 ms), and the other
role is pinned: the tests check the wiring (replica reports -> controller -> policy ->
replicas), not the engine's speed. Deadlines are hang guards only.
"""

from __future__ import annotations

import asyncio
import threading

import httpx

from tests.e2e.conftest import app_args
from tests.e2e.serve_apps import deploy, running_replicas, serving, wait_until

APPS = {"decode": ("autoscale", "/autoscale"), "prefill": ("autoscalep", "/autoscalep")}


def _serve_config(model_dir: str, scaled: str) -> dict:
    """An app whose `scaled` role may go 1 -> 2 replicas, with an SLO every load breaks."""
    args = app_args(model_dir, "disaggregated")
    pinned = "prefill" if scaled == "decode" else "decode"
    args["slo"] = ({"ttft_ms": 60_000, "tpot_ms": 0.1} if scaled == "decode"
                   else {"ttft_ms": 1, "tpot_ms": 60_000})
    args["autoscaler"] = {
        "enabled": True, pinned: {"min_replicas": 1, "max_replicas": 1},
        scaled: {"min_replicas": 1, "max_replicas": 2},
        "upscale_after_s": 1, "downscale_after_s": 2, "cooldown_s": 3,
        "look_back_period_s": 3, "metrics_interval_s": 0.5}
    app, route = APPS[scaled]
    return {"applications": [{
        "name": app, "route_prefix": route, "import_path": "cluster.app:build_app",
        "autoscaling_policy": {"policy_function": "cluster.slo_autoscaler:slo_policy"},
        "args": args}]}


class Load:
    """4 clients sending requests back to back until stopped: streams of 64 tokens, or with
    `prompt_heavy` 400-token prompts for one token each."""

    def __init__(self, base: str, prompt_heavy: bool = False) -> None:
        self.base, self.stop, self.done = base, threading.Event(), 0
        self.prompt_heavy = prompt_heavy
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _one(self, client: httpx.AsyncClient, i: int) -> None:
        k = 0
        while not self.stop.is_set():
            k += 1  # a fresh prompt each time: no prefix-cache hits to shrink the prefill
            n_prompt, n_out = (400, 1) if self.prompt_heavy else (20, 64)
            prompt = [(i * 997 + k * 31 + j) % 1900 + 6 for j in range(n_prompt)]
            body = {"prompt": prompt, "max_tokens": n_out,
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


def _scale_under_load(cluster, scaled: str) -> None:
    from ray import serve

    pinned = "prefill" if scaled == "decode" else "decode"
    app, route = APPS[scaled]
    deploy(_serve_config(cluster["model_dir"], scaled))
    base = f"{cluster['base']}{route}"
    try:
        wait_until("the app", lambda: serving(app, base))
        assert (running_replicas(app, scaled), running_replicas(app, pinned)) == (1, 1)
        load = Load(base, prompt_heavy=scaled == "prefill")
        load.thread.start()
        try:
            wait_until(f"a second {scaled} replica", lambda: running_replicas(app, scaled) == 2)
        finally:
            load.stop.set()
            load.thread.join(timeout=60)
        assert not load.errors and load.done > 0 and running_replicas(app, pinned) == 1
        wait_until(f"{scaled} back at 1 replica", lambda: running_replicas(app, scaled) == 1)
    finally:
        serve.delete(app)  # its replicas leave /metrics (the pages-freed test reads it)


def test_decode_scales_up_under_load_and_back_down(cluster):
    _scale_under_load(cluster, "decode")


def test_prompt_heavy_load_scales_prefill_instead(cluster):
    _scale_under_load(cluster, "prefill")

"""What the e2e tests that run applications of their own share: waiting (hang guards only),
reading Serve's replica states and actors, an app's readiness and its /metrics counters,
deploying a Serve config, one greedy stream."""

from __future__ import annotations

import asyncio
import json
import time

import httpx

HANG_GUARD_S = 300


def wait_until(what: str, check, limit_s: float = HANG_GUARD_S) -> None:
    """Polls `check` until true; the limit only guards against a hang."""
    deadline = time.time() + limit_s
    while not check():
        assert time.time() < deadline, f"gave up waiting for {what}"
        time.sleep(0.25)


def running_replicas(app_name: str, role: str) -> int:
    """Replicas of deployment `role` of `app_name` that Serve reports RUNNING."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None or role not in app.deployments:
        return 0
    return sum(n for state, n in app.deployments[role].replica_states.items()
               if str(state).endswith("RUNNING"))


def serving(app_name: str, base: str) -> bool:
    """`app_name` has a running decode replica and answers /health at `base` with 200."""
    try:
        return (running_replicas(app_name, "decode") > 0
                and httpx.get(f"{base}/health").status_code == 200)
    except httpx.HTTPError:
        return False


def counter(base: str, name: str) -> float:
    """Metric `name` summed over every replica on `base`'s /metrics."""
    from bench.soak import parse_metrics

    return sum(parse_metrics(httpx.get(f"{base}/metrics", timeout=30).text, name).values())


def replica_actors(app_name: str, role: str) -> set[str]:
    """Names of the live replica actors of deployment `role` of `app_name`."""
    import ray

    prefix = f"SERVE_REPLICA::{app_name}#{role}#"
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(prefix)}


def deploy(config: dict) -> None:
    """As `serve deploy` (or a PUT to the dashboard's REST API) sends a Serve config."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))


async def stream_completion(http: httpx.AsyncClient, prompt: list[int], n: int,
                            started: asyncio.Event | None = None) -> tuple[str, str]:
    """('ok' | 'error' | 'cut', text) of one greedy streamed completion; `started` is set at its
    first token."""
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True,
            "stream": True}
    text = ""
    async with http.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return "error", f"HTTP {r.status_code}"
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                return "ok", text
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return "error", event["error"]["message"]
            if event["choices"]:
                text += event["choices"][0]["text"]
                if started is not None:
                    started.set()
    return "cut", text

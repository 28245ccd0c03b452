"""Scaling one role from the CLI's config (`serve deploy`, the dashboard's Serve REST API: both
send a Serve config) while streams run: a fourth application on the shared cluster, deployed
through Serve's declarative path, with the replica counts in the config's `deployments:` list.

- before any request, every serving replica's /metrics says its page accounting is sound;
- decode 1 -> 2: a decode replica is added; the prefill, ingress and first decode replicas are
  the same actors as before; every running stream ends with the clean run's text;
- decode 2 -> 1 with a 1 s graceful-shutdown bound while long streams run: the stopped replica's
  streams move to the other one (the resume path) and still end with the clean run's text;
- a change under `args:` replaces every replica: the old ingress replicas drain their streams
  (their decode replicas' streams resume on the new ones), and none is cut.
Deadlines are hang guards only.
"""

from __future__ import annotations

import asyncio

import httpx

from tests.e2e.conftest import app_args
from tests.e2e.serve_apps import (
    HANG_GUARD_S,
    counter,
    deploy,
    replica_actors,
    running_replicas,
    stream_completion,
    wait_until,
)
from tests.hf_reference import hf_greedy

APP, ROUTE = "cliscale", "/cliscale"
LONG = 300  # tokens per stream: long enough to outlive a 1 s graceful shutdown on 2 cores


def _config(model_dir: str, decode_replicas: int, app: str = APP, route: str = ROUTE,
            max_stop_sequences: int = 4) -> dict:
    args = app_args(model_dir, "disaggregated")
    args["limits"] = {"max_stop_sequences": max_stop_sequences}  # a change under `args:`
    for role in ("prefill", "decode", "ingress"):
        args.pop(role)  # placement and counts: Serve's own `deployments:` list below
    return {"applications": [{
        "name": app, "route_prefix": route, "import_path": "cluster.app:build_app",
        "args": args,
        "deployments": [
            {"name": "prefill", "num_replicas": 1, "ray_actor_options": {"num_cpus": 0}},
            {"name": "decode", "num_replicas": decode_replicas,
             "ray_actor_options": {"num_cpus": 0}, "graceful_shutdown_timeout_s": 1},
            {"name": "ingress", "num_replicas": 1, "ray_actor_options": {"num_cpus": 0}}]}]}


def _integrity(base: str, replicas: dict[str, set[str]]) -> dict[tuple[str, str], float]:
    """pdserve_kv_integrity_ok of this app's serving replicas, by (role, replica id)."""
    from bench.soak import parse_metrics

    ids = {name.rsplit("#", 1)[1] for role in ("prefill", "decode") for name in replicas[role]}
    text = httpx.get(f"{base}/metrics", timeout=30).text
    return {k: v for k, v in parse_metrics(text, "pdserve_kv_integrity_ok").items()
            if k[1] in ids}


def _ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/health", timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


async def _streams_across(base: str, prompts: list[list[int]], n: int, change) -> list:
    """Runs the streams; once the first tokens are out, `change()` (a redeploy) runs."""
    started = asyncio.Event()
    async with httpx.AsyncClient(base_url=base, timeout=HANG_GUARD_S) as http:
        tasks = [asyncio.create_task(stream_completion(http, p, n, started)) for p in prompts]
        await asyncio.wait_for(started.wait(), HANG_GUARD_S)
        await asyncio.to_thread(change)
        return await asyncio.gather(*tasks)


def test_one_role_scales_from_the_config_and_streams_finish(cluster):
    from transformers import AutoTokenizer

    model = cluster["model_dir"]
    tok = AutoTokenizer.from_pretrained(model)
    base = f"{cluster['base']}{ROUTE}"
    prompts = [[(17 * i + 5 * j) % 1900 + 6 for j in range(20 + 3 * i)] for i in range(4)]
    ref_short = [tok.decode(hf_greedy(model, p, 40), skip_special_tokens=True) for p in prompts]
    ref_long = [tok.decode(hf_greedy(model, p, LONG), skip_special_tokens=True)
                for p in prompts]
    deploy(_config(model, 1))
    try:
        wait_until("the app", lambda: _ready(base) and running_replicas(APP, "decode") == 1)
        before = {role: replica_actors(APP, role) for role in ("prefill", "decode", "ingress")}
        # before any request, each new serving replica reports its page accounting sound
        wait_until("the integrity gauges", lambda: _integrity(base, before) == {
            (role, name.rsplit("#", 1)[1]): 1.0
            for role in ("prefill", "decode") for name in before[role]})

        def scale_up() -> None:
            deploy(_config(model, 2))
            wait_until("a second decode replica", lambda: running_replicas(APP, "decode") == 2)

        results = asyncio.run(_streams_across(base, prompts, 40, scale_up))
        assert results == [("ok", r) for r in ref_short]
        after = {role: replica_actors(APP, role) for role in ("prefill", "decode", "ingress")}
        assert after["prefill"] == before["prefill"] and after["ingress"] == before["ingress"]
        assert before["decode"] < after["decode"] and len(after["decode"]) == 2

        def scale_down() -> None:
            deploy(_config(model, 1))
            wait_until("one decode replica", lambda: len(replica_actors(APP, "decode")) == 1)

        resumed = counter(base, "pdserve_api_resumed_requests_total")
        results = asyncio.run(_streams_across(base, prompts, LONG, scale_down))
        assert results == [("ok", r) for r in ref_long]  # handed over, none cut
        # which streams the stopped replica held is Serve's routing: printed, not asserted
        print(f"\nscale-down: {counter(base, 'pdserve_api_resumed_requests_total') - resumed:.0f}"
              " of 4 streams resumed on the remaining decode replica")
        final = {role: replica_actors(APP, role) for role in ("prefill", "decode", "ingress")}
        assert final["prefill"] == before["prefill"] and final["ingress"] == before["ingress"]
        assert len(final["decode"]) == 1 and final["decode"] < after["decode"]
    finally:
        from ray import serve

        serve.delete(APP)  # its replicas leave /metrics (the pages-freed test reads it)


def test_a_redeploy_of_every_replica_cuts_no_stream(cluster):
    from ray import serve
    from transformers import AutoTokenizer

    app, route = "redeploy", "/redeploy"
    model = cluster["model_dir"]
    tok = AutoTokenizer.from_pretrained(model)
    base = f"{cluster['base']}{route}"
    prompts = [[(29 * i + 3 * j) % 1900 + 6 for j in range(24 + 5 * i)] for i in range(3)]
    ref = [tok.decode(hf_greedy(model, p, LONG), skip_special_tokens=True) for p in prompts]
    deploy(_config(model, 1, app, route))
    try:
        wait_until("the app", lambda: _ready(base))
        before = {role: replica_actors(app, role) for role in ("prefill", "decode", "ingress")}

        def redeploy() -> None:
            deploy(_config(model, 1, app, route, max_stop_sequences=5))
            wait_until("every replica replaced", lambda: all(
                replica_actors(app, role) and not replica_actors(app, role) & before[role]
                for role in before))

        results = asyncio.run(_streams_across(base, prompts, LONG, redeploy))
        assert results == [("ok", r) for r in ref]
    finally:
        serve.delete(app)

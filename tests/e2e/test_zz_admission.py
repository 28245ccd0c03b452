"""Cluster-wide admission over real HTTP: an app of its own on the shared cluster with 2 ingress
replicas and `max_concurrent_requests: N`, every request through the Serve proxy.

- N long streams are admitted and hold the limit: the admission ledger counts N slots over
  both ingress replicas (its holders), and both replicas hold some;
- further requests get 429 + Retry-After through either ingress replica (each replica's
  /metrics counts its own refusals), not 2N admitted as with a gate per replica;
- once the streams' clients leave, every slot comes back and N requests are admitted again;
- the ledger killed: requests are still admitted (fail open, to a local share), and the
  replicas' renewals start a new ledger that counts both of them.
Deadlines and round counts are hang guards only.
"""

from __future__ import annotations

import asyncio

import httpx

from bench.soak import parse_metrics
from tests.e2e.conftest import app_args
from tests.e2e.serve_apps import running_replicas, wait_until

APP, PREFIX = "admit", "/admit"
LIMIT = 4
HOLD_TOKENS = 1800  # far more than the streams run for meanwhile: the test ends them
HANG_GUARD_S = 120
ROUNDS = 20  # bursts of probes at most, until both replicas have refused some


def _ledger():
    import ray

    from serving.admission_ledger import NAMESPACE
    from serving.ledger_actor import ledger_name

    return ray.get_actor(ledger_name(APP, "ingress"), namespace=NAMESPACE)


def _ledger_counts() -> dict[str, int]:
    import ray

    return ray.get(_ledger().counts.remote(), timeout=30)


def _new_ledger_counts(old) -> dict[str, int] | None:
    try:
        return None if _ledger() == old else _ledger_counts()
    except ValueError:  # not started again yet
        return None


async def _hold(http: httpx.AsyncClient, i: int, streaming: asyncio.Event,
                release: asyncio.Event) -> int:
    body = {"prompt": f"Stream {i} of the admission test", "max_tokens": HOLD_TOKENS,
            "temperature": 0, "ignore_eos": True, "stream": True}
    async with http.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code == 200:
            lines = r.aiter_lines()
            while not (await lines.__anext__()).startswith("data: {"):
                pass
        streaming.set()
        await release.wait()  # leaving the block closes the stream: the server aborts it
        return r.status_code


async def _probe(http: httpx.AsyncClient, i: int) -> tuple[int, str | None]:
    r = await http.post("/v1/completions", json={"prompt": f"probe {i}", "max_tokens": 4})
    if r.status_code == 429:
        assert r.json()["error"]["type"] == "rate_limit_error"
    return r.status_code, r.headers.get("retry-after")


async def _api_metrics(http: httpx.AsyncClient, seen: dict[str, dict[str, float]]) -> None:
    """Scrapes /metrics in a burst (the proxy spreads them) and keeps, per ingress replica,
    its own API counters (each replica reports only its own)."""
    texts = await asyncio.gather(*(http.get("/metrics") for _ in range(8)))
    for r in texts:
        for name in ("pdserve_api_rejected_requests_total", "pdserve_api_active_requests"):
            for (role, replica), value in parse_metrics(r.text, name).items():
                if role == "api":
                    seen.setdefault(replica, {})[name] = value


async def _overload(base: str) -> tuple[list[int], dict, list, dict]:
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=base, timeout=HANG_GUARD_S, limits=limits) as http:
        # The proxy learns of new replicas on its own schedule: until both have answered, the
        # holders below could all go to the one it knows.
        known: dict[str, dict[str, float]] = {}
        for _ in range(ROUNDS):
            await _api_metrics(http, known)
            if len(known) == 2:
                break
        assert len(known) == 2, "the proxy routes to one ingress replica only"
        release = asyncio.Event()
        holders = []
        for i in range(LIMIT):  # one at a time: the proxy sends each to the less busy replica
            streaming = asyncio.Event()
            holders.append(asyncio.create_task(_hold(http, i, streaming, release)))
            await asyncio.wait_for(streaming.wait(), HANG_GUARD_S)
        held = _ledger_counts()
        probes: list[tuple[int, str | None]] = []
        seen: dict[str, dict[str, float]] = {}
        for round_ in range(ROUNDS):
            probes += await asyncio.gather(*(_probe(http, 100 * round_ + j)
                                             for j in range(2 * LIMIT)))
            await _api_metrics(http, seen)
            if len(seen) == 2 and all(m.get("pdserve_api_rejected_requests_total", 0) > 0
                                      for m in seen.values()):
                break
        release.set()
        statuses = await asyncio.gather(*holders)
    return statuses, held, probes, seen


def test_two_ingress_replicas_share_the_limit(cluster):
    from ray import serve

    from cluster.app import build_app

    args = app_args(cluster["model_dir"], "disaggregated")
    args["ingress"] = {**args["ingress"], "num_replicas": 2}
    args["limits"] = {"max_concurrent_requests": LIMIT}
    args["request_timeout_s"] = 60
    serve.run(build_app(args), name=APP, route_prefix=PREFIX)
    base = cluster["base"] + PREFIX
    try:
        wait_until("the app", lambda: running_replicas(APP, "ingress") == 2
              and httpx.get(f"{base}/health", timeout=10).status_code == 200)
        statuses, held, probes, seen = asyncio.run(_overload(base))
        print(f"\nadmission: ledger {held}; {len(probes)} probes; per ingress replica "
              f"{seen}")
        assert statuses == [200] * LIMIT
        # N slots over two holders, both of them holding some (each under the limit alone)
        assert sum(held.values()) == LIMIT and len(held) == 2
        assert all(0 < n < LIMIT for n in held.values()), held
        assert probes == [(429, "1")] * len(probes)
        assert len(seen) == 2, "a single ingress replica answered every /metrics scrape"
        assert all(m["pdserve_api_rejected_requests_total"] > 0 for m in seen.values()), seen
        # The clients left: every slot comes back (a hang guard only) ...
        wait_until("the slots to come back", lambda: sum(_ledger_counts().values()) == 0)

        async def again() -> list[tuple[int, str | None]]:
            async with httpx.AsyncClient(base_url=base, timeout=HANG_GUARD_S) as http:
                return await asyncio.gather(*(_probe(http, 1000 + i) for i in range(LIMIT)))

        # ... and N requests at once are all admitted.
        assert [s for s, _ in asyncio.run(again())] == [200] * LIMIT
        import ray

        old = _ledger()
        ray.kill(old, no_restart=True)
        for i in range(LIMIT):  # one at a time: within either replica's share
            r = httpx.post(f"{base}/v1/completions", timeout=HANG_GUARD_S,
                           json={"prompt": f"while the ledger is away {i}", "max_tokens": 2})
            assert r.status_code == 200
        wait_until("a new ledger", lambda: _new_ledger_counts(old) is not None
              and len(_new_ledger_counts(old)) == 2)
    finally:
        import ray

        serve.delete(APP)  # its replicas leave /metrics (the pages-freed test reads it)
        try:
            ray.kill(_ledger())  # else it ends itself once idle
        except ValueError:
            pass

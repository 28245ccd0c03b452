"""Failures and overload over real HTTP, on a third app of its own (2 prefill + 2 decode replicas
at /kill, at most 8 concurrent requests) so that killing its replicas leaves the shared apps be.

- overload at 4x the concurrency limit: while the admitted requests run, the excess gets
  429 + Retry-After at once (not queued for a slot); once they leave, admitted requests complete;
- ray.kill of a prefill replica, then of a decode replica, while greedy streams run: each stream
  ends with the tokens of a clean run, or with a clean error event; none hangs.
"""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
import pytest

from bench.soak import parse_metrics
from tests.e2e.conftest import app_args
from tests.e2e.serve_apps import counter

APP, PREFIX = "kill", "/kill"
CONCURRENCY_LIMIT = 8
STREAM_TIMEOUT_S = 90
HOLD_TOKENS = 1800  # the tiny model's 2048 positions, less the prompt


@pytest.fixture(scope="module")
def kill_app(cluster):
    from ray import serve

    from cluster.app import build_app

    args = app_args(cluster["model_dir"], "disaggregated")
    args["prefill"] = {**args["prefill"], "num_replicas": 2}
    args["decode"] = {**args["decode"], "num_replicas": 2}
    args["limits"] = {"max_concurrent_requests": CONCURRENCY_LIMIT}
    args["request_timeout_s"] = 60
    args["submit_batch"] = 32  # failover of requests sent many to a call (the shared pd app: 1)
    serve.run(build_app(args), name=APP, route_prefix=PREFIX)
    base = cluster["base"] + PREFIX
    deadline = time.time() + 60
    while httpx.get(f"{base}/health", timeout=10).status_code != 200:
        assert time.time() < deadline, "the kill app never became ready"
        time.sleep(0.5)
    yield base
    serve.delete(APP)


def replicas(deployment: str) -> list[str]:
    import ray

    prefix = f"SERVE_REPLICA::{APP}#{deployment}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(prefix))


def kill(name: str) -> None:
    import ray

    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)


def prompt(i: int) -> str:
    rng = random.Random(i)
    words = "the river ran past old mill where a keeper of bees sang to lanterns".split()
    return f"Stream {i}: " + " ".join(rng.choices(words, k=12 + 40 * (i % 3)))


async def stream(http: httpx.AsyncClient, text: str, n: int, seen: list[int] | None = None
                 ) -> tuple[str, list[int]]:
    """('ok' | 'error', token ids) of one greedy /generate_stream."""
    ids: list[int] = []
    body = {"inputs": text, "parameters": {"max_new_tokens": n}}
    async with http.stream("POST", "/generate_stream", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            event = json.loads(line[5:])
            if "error" in event:
                assert event["error_type"] == "generation" and event["error"], event
                return "error", ids
            ids.append(event["token"]["id"])
            if seen is not None:
                seen.append(1)
            if event["generated_text"] is not None:
                return "ok", ids
    return "truncated", ids


async def run_streams(base: str, texts: list[str], n: int, during=None) -> list[tuple]:
    """Runs the streams concurrently; `during(seen)` runs alongside (the failure injector)."""
    seen: list[int] = []
    async with httpx.AsyncClient(base_url=base, timeout=STREAM_TIMEOUT_S) as http:
        tasks = [asyncio.wait_for(stream(http, t, n, seen), STREAM_TIMEOUT_S) for t in texts]
        extra = [during(seen)] if during else []
        results = await asyncio.gather(*tasks, *extra)
    return results[:len(texts)]


def test_request_id_is_echoed_once_and_health_is_ready(kill_app):
    r = httpx.post(f"{kill_app}/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                   headers={"X-Request-Id": "kill-test-1"}, timeout=60)
    assert r.status_code == 200 and r.headers.get_list("x-request-id") == ["kill-test-1"]
    r = httpx.post(f"{kill_app}/v1/completions", json={"prompt": "hi", "max_tokens": 0})
    assert r.status_code == 400 and len(r.headers.get_list("x-request-id")) == 1
    assert httpx.get(f"{kill_app}/health", timeout=30).json()["status"] == "ok"


class Holder:
    """A streamed completion that holds its concurrency slot until the test lets it go: it asks
    for far more tokens (HOLD_TOKENS) than it streams meanwhile, so the test ends it (and checks
    that it did not end by itself)."""

    def __init__(self, http: httpx.AsyncClient, i: int, release: asyncio.Event) -> None:
        self.status, self.chunks, self.ended = 0, 0, False
        self.streaming = asyncio.Event()  # admitted, first tokens out
        self.task = asyncio.create_task(self._run(http, i, release))

    async def _run(self, http: httpx.AsyncClient, i: int, release: asyncio.Event) -> None:
        body = {"prompt": prompt(i), "max_tokens": HOLD_TOKENS, "temperature": 0,
                "ignore_eos": True, "stream": True}
        async with http.stream("POST", "/v1/completions", json=body) as r:
            self.status = r.status_code
            if r.status_code != 200:  # not admitted: the test fails on the status
                self.streaming.set()
                return
            reader = asyncio.create_task(self._read(r))
            await release.wait()
            reader.cancel()  # the client goes: the server aborts the request
            await asyncio.gather(reader, return_exceptions=True)

    async def _read(self, r: httpx.Response) -> None:
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                self.ended = True
                return
            if line.startswith("data:"):
                self.chunks += 1
                self.streaming.set()


def test_overload_at_4x_the_limit(kill_app):
    async def one(http: httpx.AsyncClient, i: int, n: int = 48) -> tuple[int, float]:
        start = time.perf_counter()
        r = await http.post("/v1/completions", json={
            "prompt": prompt(i), "max_tokens": n, "temperature": 0, "ignore_eos": True})
        dt = time.perf_counter() - start
        if r.status_code == 429:
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "rate_limit_error"
        else:
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == n
        return r.status_code, dt

    async def overload():
        async with httpx.AsyncClient(base_url=kill_app, timeout=60,
                                     limits=httpx.Limits(max_connections=64)) as http:
            await http.get("/v1/models")  # warm the connection pool's first connection
            release = asyncio.Event()
            holders = [Holder(http, i, release) for i in range(CONCURRENCY_LIMIT)]
            # A hang guard only: every holder is admitted (the app is idle) and streams.
            await asyncio.wait_for(asyncio.gather(*(h.streaming.wait() for h in holders)), 60)
            # The limit is taken: the rest of a 4x burst, then excess requests one at a time.
            burst = await asyncio.gather(*(one(http, 100 + i)
                                           for i in range(3 * CONCURRENCY_LIMIT)))
            probes = [await one(http, 200 + i) for i in range(3 * CONCURRENCY_LIMIT)]
            ended = [h.ended for h in holders]  # checked below: none ran out by itself
            release.set()
            await asyncio.gather(*(h.task for h in holders))
            return holders, ended, burst, probes

    async def after(n: int = 48) -> list[tuple[int, float]]:
        async with httpx.AsyncClient(base_url=kill_app, timeout=60) as http:
            return await asyncio.gather(*(one(http, 300 + i, n)
                                          for i in range(CONCURRENCY_LIMIT)))

    holders, ended, burst, probes = asyncio.run(overload())
    burst_ms = sorted(dt * 1000 for _, dt in burst)
    probe_ms = sorted(dt * 1000 for _, dt in probes)
    print(f"\noverload with the limit taken: burst of {len(burst)} x 429 in "
          f"{burst_ms[0]:.0f}..{burst_ms[-1]:.0f} ms (median {burst_ms[len(burst_ms) // 2]:.0f});"
          f" one at a time: {len(probes)} x 429 in {probe_ms[0]:.0f}..{probe_ms[-1]:.0f} ms "
          f"(median {probe_ms[len(probe_ms) // 2]:.0f}); holders streamed "
          f"{[h.chunks for h in holders]} chunks")
    assert [h.status for h in holders] == [200] * CONCURRENCY_LIMIT
    # Every excess request got its 429 while all the admitted requests were still running:
    # refused at once, not queued for a slot (a queued one would wait for a holder to end,
    # and only the test ends them, after these answers are in).
    assert ended == [False] * CONCURRENCY_LIMIT
    assert [status for status, _ in burst] == [429] * len(burst)
    assert [status for status, _ in probes] == [429] * len(probes)
    # The holders' clients left: their slots come back (a hang guard only: 60 s) ...
    deadline = time.time() + 60
    while counter(kill_app, "pdserve_api_active_requests") > 0:
        assert time.time() < deadline, "the holders' slots were never given back"
        time.sleep(0.5)
    # ... and a full set of admitted requests runs to completion.
    admitted = asyncio.run(after())
    assert [status for status, _ in admitted] == [200] * CONCURRENCY_LIMIT


def test_kill_prefill_then_decode_replica(kill_app):
    texts = [prompt(i) for i in range(6)]
    n = 160
    clean = asyncio.run(run_streams(kill_app, texts, n))
    assert all(status == "ok" for status, _ in clean)
    retries0 = counter(kill_app, "pdserve_prefill_retries_total")

    async def kill_prefill(seen: list[int]) -> None:
        await asyncio.sleep(0.05)  # prompts are on their way to prefill
        kill(replicas("prefill")[0])

    after_prefill = asyncio.run(run_streams(kill_app, texts, n, kill_prefill))
    decode_victims: list[str] = []

    async def kill_decode(seen: list[int]) -> None:
        while len(seen) < 5 * len(texts):  # every stream is under way
            await asyncio.sleep(0.01)
        # The decode replica with the most running requests.
        running = parse_metrics(httpx.get(f"{kill_app}/metrics", timeout=30).text,
                                "pdserve_num_running")
        names = replicas("decode")
        names.sort(key=lambda a: -running.get(("decode", a.rsplit("#", 1)[1]), 0))
        decode_victims.append(names[0])
        kill(names[0])

    after_decode = asyncio.run(run_streams(kill_app, texts, n, kill_decode))
    retries = counter(kill_app, "pdserve_prefill_retries_total") - retries0
    resumed = counter(kill_app, "pdserve_api_resumed_requests_total")
    outcomes = {"prefill kill": [s for s, _ in after_prefill],
                "decode kill": [s for s, _ in after_decode]}
    print(f"\nkill: {outcomes}; prefill retries {retries:.0f}, resumed streams {resumed:.0f}")
    for results in (after_prefill, after_decode):
        for (status, ids), (_, ref) in zip(results, clean):
            assert status in ("ok", "error")
            if status == "ok":
                assert ids == ref  # the tokens of the clean run
            else:
                assert ids == ref[:len(ids)]
    assert [s for s, _ in after_decode].count("ok") >= len(texts) - 1
    assert decode_victims and resumed >= 1

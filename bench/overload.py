"""How fast an overloaded cluster says no: a burst against `max_concurrent_requests`.

python -m bench.overload [--config configs/tiny.yaml] [--limit 8] [--burst 32] [--repeats 3]
    [--client raw|aiohttp]

Any config: the requests name the model that `/v1/models` lists (on the GPU host, e.g.
`--config configs/llama3-8b-gpu-colocated.yaml` after `python -m bench.gpu_serve
--make-model-only`).

Starts `serve run CONFIG` with `limits.max_concurrent_requests` set to `--limit`, fills the limit
with long streams (each admitted: its status line has come), then sends `--burst` requests at
once (`--repeats` times) and prints the latency of their 429 answers (p50, p99, max, and the
slowest of each burst) and how many were admitted. The bursts go through `bench.raw_http` (one
kept-alive connection per request of a burst) unless `--client aiohttp`; the held streams
always through aiohttp.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import aiohttp
import yaml

from bench.client import fetch_first_model
from bench.launcher import ServerProcess, expand
from bench.raw_http import RawConnection, post_json_request
from bench.stats import percentile

LONG = {"prompt": "Once upon a time", "max_tokens": 1800, "ignore_eos": True, "temperature": 0,
        "stream": True}
SHORT = {"prompt": "Hello", "max_tokens": 4, "temperature": 0}


def limited_config(config: str, limit: int) -> Path:
    cfg = yaml.safe_load(Path(config).read_text())
    cfg["applications"][0]["args"].setdefault("limits", {})["max_concurrent_requests"] = limit
    path = Path(tempfile.mkdtemp()) / "overload.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


async def burst(base: str, model: str, limit: int, n: int, repeats: int = 1,
                client: str = "raw") -> tuple[list[list[float]], int]:
    """Hold `limit` streams, then send `repeats` bursts of `n` requests, one after the other.
    Returns each burst's 429 latencies (seconds) and how many requests were admitted.

    The client keeps its connections: the first burst opens `n` new ones, the later bursts
    reuse them. On two cores the first burst is often the slowest, but slow bursts come at any
    point (docs/cpu-benchmarks.md, "Threads, niceness and the slow bursts, again").

    `client` "raw" sends the bursts through `bench.raw_http`, "aiohttp" through the session
    that holds the streams. On two shared cores the client's own cost per request is part of
    what a burst measures: httpx's was most of it (429 p50 430 ms against 86 ms with aiohttp,
    same server, 2026-12-01), and aiohttp's new connections still added tens of ms to the
    first burst (docs/cpu-benchmarks.md, "32 streams against one, and the burst's own
    client")."""
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(base, connector=aiohttp.TCPConnector(limit=0),
                                     timeout=timeout) as session:
        long, short = {**LONG, "model": model}, {**SHORT, "model": model}
        started = [asyncio.Event() for _ in range(limit)]

        async def hold(i: int) -> str:
            """Stream one long completion; returns how it ended (it should outlast the bursts)."""
            async with session.post("/v1/completions", json=long) as r:
                # Admitted: the status line came. Its events may come much later: the API sends
                # none for a token without text (no logprobs asked), and random weights' ids past
                # a small tokenizer's vocabulary have none.
                started[i].set()
                events, last = 0, b""
                async for line in r.content:
                    if line.startswith(b"data:") and not line.startswith(b"data: [DONE]"):
                        events, last = events + 1, line
                return f"HTTP {r.status}, {events} events before [DONE], the last: {last[:300]!r}"

        holders = [asyncio.create_task(hold(i)) for i in range(limit)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 300)

        raw = [RawConnection(base) for _ in range(n)] if client == "raw" else []
        request = post_json_request(base, "/v1/completions", short)

        async def one(i: int) -> tuple[int, float]:
            t = time.perf_counter()
            if client == "raw":
                status, _, _ = await raw[i].send(request)
                return status, time.perf_counter() - t
            async with session.post("/v1/completions", json=short) as r:
                await r.read()
                return r.status, time.perf_counter() - t

        bursts: list[list[tuple[int, float]]] = []
        for _ in range(repeats):
            bursts.append(await asyncio.gather(*(one(i) for i in range(n))))
            await asyncio.sleep(0.5)  # let the previous burst's connections settle
        ended = [repr(h.exception()) if h.exception() else h.result()
                 for h in holders if h.done()]
        if ended:  # a burst may then have been admitted into a freed slot: say so
            print(f"WARNING: {len(ended)} of the {limit} held streams ended before the last "
                  f"burst; the first: {ended[0]}")
        for h in holders:
            h.cancel()
        await asyncio.gather(*holders, return_exceptions=True)
        await asyncio.gather(*(c.close() for c in raw))
    rejected = [[dt for code, dt in answers if code == 429] for answers in bursts]
    return rejected, sum(code == 200 for answers in bursts for code, _ in answers)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--base-url", default="http://127.0.0.1:8000")
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--burst", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="bursts, one after the other")
    ap.add_argument("--client", choices=("raw", "aiohttp"), default="raw",
                    help="what sends the bursts (the held streams: aiohttp)")
    args = ap.parse_args(argv)
    config = limited_config(args.config, args.limit)
    server = ServerProcess(expand("{serve} run {config}", str(config)),
                           f"{args.base_url}/health", config.parent / "serve.log")
    server.start()
    try:
        server.wait_ready(timeout=300)
        model = fetch_first_model(args.base_url)  # the requests name it: any config
        rejected, admitted = asyncio.run(burst(args.base_url, model, args.limit, args.burst,
                                                 args.repeats, args.client))
    finally:
        server.stop()
    ms = sorted(dt * 1e3 for each in rejected for dt in each)
    print(f"{args.repeats} bursts of {args.burst} against a limit of {args.limit} "
          f"(all {args.limit} held), sent through {args.client}: "
          f"{len(ms)} got 429, {admitted} admitted")
    if ms:
        print(f"429 latency: p50 {percentile(ms, 50):.0f} ms, p99 {percentile(ms, 99):.0f} ms, "
              f"max {ms[-1]:.0f} ms")
    slowest = [f"{max(each) * 1e3:.0f}" for each in rejected if each]
    if slowest:
        print(f"slowest 429 of each burst (the first on new connections): "
              f"{', '.join(slowest)} ms")


if __name__ == "__main__":
    main()

"""Load generation: when each request is sent, and sending them.

Open loop: requests arrive as a Poisson process at `rate` (gamma intervals when burstiness
!= 1; rate inf sends all at once), independent of how fast the server answers. Closed loop:
`concurrency` caps the requests in flight, so with rate inf each finished request lets the next
one go, as N users in a loop would. Both can be combined (Poisson arrivals, capped in flight).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from bench.client import RequestRecord, completion_payload, stream_completion
from bench.progress import Progress
from bench.workloads import RequestSpec


def arrival_offsets(
    n: int, rate: float, seed: int | str = 0, burstiness: float = 1.0
) -> list[float]:
    """Send times in seconds from the start of the run, deterministic per seed.

    Intervals are gamma(shape=burstiness, mean=1/rate): burstiness 1 is Poisson, below 1 is
    burstier, above 1 more regular. Rate inf puts every request at 0.
    """
    if rate <= 0 or burstiness <= 0:
        raise ValueError("rate and burstiness must be > 0")
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
    return out


@dataclass
class LoadResult:
    records: list[RequestRecord]
    duration: float  # first send to last completion, seconds
    rate: float
    concurrency: int | None
    meta: dict[str, Any] = field(default_factory=dict)
    start_unix: float = 0.0  # time.time() when send_time was 0: lines up with server logs


async def run_load(
    specs: Sequence[RequestSpec],
    send: Callable[[RequestSpec], Awaitable[RequestRecord]],
    rate: float = math.inf,
    concurrency: int | None = None,
    seed: int | str = 0,
    burstiness: float = 1.0,
    progress: Progress | None = None,
) -> LoadResult:
    """Send `specs` in order on the arrival schedule and gather one record per request,
    in the order of `specs`."""
    if concurrency is not None and concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    offsets = arrival_offsets(len(specs), rate, seed, burstiness)
    limit = asyncio.Semaphore(concurrency) if concurrency else None
    t0, start_unix = time.perf_counter(), time.time()

    async def one(offset: float, spec: RequestSpec) -> RequestRecord:
        delay = t0 + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if limit is not None:
            # Semaphore waiters wake in FIFO order, so requests still go out in arrival order.
            async with limit:
                sent = time.perf_counter()
                record = await send(spec)
        else:
            sent = time.perf_counter()
            record = await send(spec)
        record.send_time = sent - t0
        if progress is not None:
            progress.update(record.ok)
        return record

    records = await asyncio.gather(*(one(o, s) for o, s in zip(offsets, specs)))
    return LoadResult(list(records), time.perf_counter() - t0, rate, concurrency,
                      start_unix=start_unix)


@dataclass(frozen=True)
class ClientConfig:
    base_url: str = "http://127.0.0.1:8000"
    endpoint: str = "/v1/completions"
    model: str = ""
    ignore_eos: bool = True
    include_usage: bool = True
    timeout_s: float = 600.0
    extra_body: dict[str, Any] = field(default_factory=dict)
    count_empty_chunks: bool = False

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + self.endpoint


def run_http(
    specs: Sequence[RequestSpec],
    client: ClientConfig,
    rate: float = math.inf,
    concurrency: int | None = None,
    seed: int | str = 0,
    burstiness: float = 1.0,
    progress: Progress | None = None,
) -> LoadResult:
    """One benchmark run over HTTP, in a fresh event loop and connection pool."""

    async def go() -> LoadResult:
        connector = aiohttp.TCPConnector(limit=0)  # the schedule, not the pool, caps in-flight
        timeout = aiohttp.ClientTimeout(total=client.timeout_s)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

            def send(spec: RequestSpec) -> Awaitable[RequestRecord]:
                payload = completion_payload(
                    client.model, spec, client.ignore_eos, client.include_usage, client.extra_body
                )
                return stream_completion(session, client.url, payload, spec,
                                         client.count_empty_chunks)

            return await run_load(specs, send, rate, concurrency, seed, burstiness, progress)

    try:
        return asyncio.run(go())
    finally:
        if progress is not None:
            progress.close()

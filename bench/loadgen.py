"""Load generation: when each request is sent, and sending them.

Open loop: requests arrive as a Poisson process at `rate` (gamma intervals when burstiness
!= 1; rate inf sends all at once), independent of how fast the server answers. Closed loop:
`concurrency` caps the requests in flight, so with rate inf each finished request lets the next
one go, as N users in a loop would. Both can be combined (Poisson arrivals, capped in flight).

A Python client has a cost per streamed event (~50 us on a 2-core machine: aiohttp, the SSE
parser, `json.loads`), so one client process can lag a server streaming tens of thousands of
events a second. `processes` > 1 splits the requests and the concurrency over that many client
processes started together; the run's `client_cpu_s` says how busy the client was.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
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
    client_cpu_s: float = 0.0  # CPU time of the client process(es) over the run


async def run_load(
    specs: Sequence[RequestSpec],
    send: Callable[[RequestSpec], Awaitable[RequestRecord]],
    rate: float = math.inf,
    concurrency: int | None = None,
    seed: int | str = 0,
    burstiness: float = 1.0,
    progress: Progress | None = None,
    offsets: Sequence[float] | None = None,
    start_at: float | None = None,
) -> LoadResult:
    """Send `specs` in order on the arrival schedule and gather one record per request,
    in the order of `specs`. `offsets` replaces the schedule drawn from rate / seed /
    burstiness; `start_at` (a `time.perf_counter()` value, the same clock in every process of
    the machine) is when offset 0 falls, instead of now."""
    if concurrency is not None and concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    if offsets is None:
        offsets = arrival_offsets(len(specs), rate, seed, burstiness)
    limit = asyncio.Semaphore(concurrency) if concurrency else None
    if start_at is not None:
        await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
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
    processes: int = 1,
) -> LoadResult:
    """One benchmark run over HTTP, in a fresh event loop and connection pool (in each of
    `processes` client processes)."""
    if processes > 1:
        return _run_processes(specs, client, rate, concurrency, seed, burstiness, progress,
                              processes)
    try:
        return asyncio.run(_run_async(specs, client, rate, concurrency, progress,
                                      arrival_offsets(len(specs), rate, seed, burstiness)))
    finally:
        if progress is not None:
            progress.close()


async def _run_async(specs: Sequence[RequestSpec], client: ClientConfig, rate: float,
                     concurrency: int | None, progress: Progress | None,
                     offsets: Sequence[float], start_at: float | None = None) -> LoadResult:
    """The run in this process, with its CPU time (session set-up and close included)."""
    cpu0 = time.process_time()
    connector = aiohttp.TCPConnector(limit=0)  # the schedule, not the pool, caps in-flight
    timeout = aiohttp.ClientTimeout(total=client.timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        def send(spec: RequestSpec) -> Awaitable[RequestRecord]:
            payload = completion_payload(
                client.model, spec, client.ignore_eos, client.include_usage, client.extra_body
            )
            return stream_completion(session, client.url, payload, spec,
                                     client.count_empty_chunks)

        result = await run_load(specs, send, rate, concurrency, progress=progress,
                                offsets=offsets, start_at=start_at)
    result.client_cpu_s = time.process_time() - cpu0
    return result


def _run_processes(specs: Sequence[RequestSpec], client: ClientConfig, rate: float,
                   concurrency: int | None, seed: int | str, burstiness: float,
                   progress: Progress | None, processes: int) -> LoadResult:
    """The run split over `processes` client processes: request i goes to process i % n with
    its send time from the one schedule, and each process caps its share of `concurrency`.
    All start at one instant once every process is ready (imports and all). `progress` is
    drawn once, at the end."""
    n = min(processes, len(specs), concurrency or len(specs))
    offsets = arrival_offsets(len(specs), rate, seed, burstiness)
    ctx = multiprocessing.get_context("spawn")  # no copy of the parent's threads or loop
    pipes, procs = [], []
    for i in range(n):
        share = None if concurrency is None else concurrency // n + (i < concurrency % n)
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_shard_main, daemon=True,
                           args=(child, list(specs[i::n]), client, rate, share, offsets[i::n]))
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    try:
        for pipe in pipes:
            if pipe.recv() != "ready":
                raise RuntimeError("a client process failed to start")
        start_at = time.perf_counter() + 0.05
        for pipe in pipes:
            pipe.send(start_at)
        shards: list[LoadResult] = []
        for pipe in pipes:
            shard = pipe.recv()
            if isinstance(shard, BaseException):  # the process's own error, passed on
                raise RuntimeError("a client process failed") from shard
            shards.append(shard)
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    records: list[RequestRecord] = [None] * len(specs)  # type: ignore[list-item]
    for i, shard in enumerate(shards):
        records[i::n] = shard.records
    if progress is not None:  # the processes report nothing on the way: the bar ends full
        for record in records:
            progress.update(record.ok)
        progress.close()
    duration = max(s.duration for s in shards)
    # Every shard's offset 0 is the one instant `start_at`: their clocks read it alike.
    return LoadResult(records, duration, rate, concurrency,
                      start_unix=min(s.start_unix for s in shards),
                      client_cpu_s=sum(s.client_cpu_s for s in shards))


def _shard_main(pipe, specs: list[RequestSpec], client: ClientConfig, rate: float,
                concurrency: int | None, offsets: list[float]) -> None:
    """One client process: says it is ready, runs its share from the instant it is sent, and
    sends its LoadResult back (durations and send times from that instant)."""
    pipe.send("ready")
    start_at = pipe.recv()
    try:
        result = asyncio.run(_run_async(specs, client, rate, concurrency, None, offsets,
                                        start_at))
    except Exception as e:  # request failures are records; this is a bug or a bad argument
        pipe.send(e)
        return
    pipe.send(result)

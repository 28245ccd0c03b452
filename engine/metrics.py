"""Plain counters, gauges and histograms a replica keeps; rendered as Prometheus by api/."""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.output_streams import OutputSink
    from engine.outputs import RequestOutput

# The TTFT of requests a decode replica prefilled itself (decode.local_prefill_max_tokens), also
# in pdserve_ttft_seconds: what the SLO autoscaler leaves out of the TTFT it charges to prefill.
LOCAL_PREFILL_TTFT = "pdserve_local_prefill_ttft_seconds"

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0)


@dataclass
class Histogram:
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)  # per bucket; overflow counted in count only
    sum: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = self.counts or [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.buckets):
            self.counts[i] += 1
        self.sum += value
        self.count += 1

    def snapshot(self) -> dict:
        return {"buckets": list(self.buckets), "counts": list(self.counts), "sum": self.sum,
                "count": self.count}


@dataclass(frozen=True)
class EngineStats:
    """What an engine reports about itself (read between steps, or racily for gauges)."""

    pages_total: int
    pages_used: int  # referenced by requests; cached-but-unused prefix pages do not count
    pages_cached: int  # unused pages that hold a cached block (evictable)
    num_running: int
    num_waiting: int
    num_preemptions: int
    num_cascade_steps: int
    num_cascade_tokens: int
    num_prefill_tokens: int = 0  # launched steps' prompt tokens (Scheduler.num_prefill_tokens)
    num_prefill_steps: int = 0
    num_decode_tokens: int = 0


class Metrics:
    def __init__(self, role: str, replica: str) -> None:
        self.role, self.replica = role, replica
        self.counters: dict[str, float] = {}
        self.gauges: dict[str, float] = {}
        self.histograms: dict[str, Histogram] = {}
        self._counter_sources: list[Callable[[], dict[str, float]]] = []

    def add_counter_source(self, source: Callable[[], dict[str, float]]) -> None:
        """Running totals kept elsewhere (a KV transport's): `source()` joins the counters at
        each snapshot, so they are current whenever /metrics is read."""
        self._counter_sources.append(source)

    def inc(self, name: str, value: float = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + value

    def set(self, name: str, value: float) -> None:
        self.gauges[name] = value

    def observe(self, name: str, value: float) -> None:
        self.histograms.setdefault(name, Histogram()).observe(value)

    def record_engine(self, stats: EngineStats) -> None:
        """Take the engine's gauges and counters (`Engine.stats()`)."""
        self.set("pdserve_kv_pages_total", stats.pages_total)
        self.set("pdserve_kv_pages_used", stats.pages_used)
        self.set("pdserve_kv_pages_cached", stats.pages_cached)
        self.set("pdserve_num_running", stats.num_running)
        self.set("pdserve_num_waiting", stats.num_waiting)
        self.counters["pdserve_cascade_steps_total"] = stats.num_cascade_steps
        self.counters["pdserve_cascade_tokens_total"] = stats.num_cascade_tokens
        self.counters["pdserve_preemptions_total"] = stats.num_preemptions
        self.counters["pdserve_scheduled_prefill_tokens_total"] = stats.num_prefill_tokens
        self.counters["pdserve_scheduled_prefill_steps_total"] = stats.num_prefill_steps
        self.counters["pdserve_scheduled_decode_tokens_total"] = stats.num_decode_tokens

    def snapshot(self) -> dict:
        # Called from the metrics thread while the step thread may add a histogram: list()
        # copies the items in one call under the GIL, where iterating the dict could meet
        # the insertion ("dictionary changed size during iteration").
        counters = dict(self.counters)
        for source in self._counter_sources:
            counters.update(source())
        return {"role": self.role, "replica": self.replica, "gauges": dict(self.gauges),
                "counters": counters,
                "histograms": {k: h.snapshot() for k, h in list(self.histograms.items())}}


class StreamRecorder:
    """Records one request's outputs as they reach its consumer: TTFT, time per output token,
    generated and finished counts."""

    def __init__(self, metrics: Metrics, start: float) -> None:
        self.metrics, self.start = metrics, start
        self.last: float | None = None

    def observe(self, out, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        record_step(self.metrics, {out.request_id: self}, [out], now)


def record_step(metrics: Metrics, recorders: dict[str, StreamRecorder], outs: list,
                now: float) -> None:
    """`StreamRecorder.observe(out, now)` for every output of one step that has a recorder,
    with one update per metric: a step hands out an output for every running request."""
    ttft, tpot, tokens, finished = [], [], 0, {}
    for out in outs:
        rec = recorders.get(out.request_id)
        if rec is None:
            continue
        n = len(out.new_token_ids)
        if rec.last is None:
            ttft.append(now - rec.start)
        elif n:
            tpot.append((now - rec.last) / n)
        rec.last = now
        tokens += n
        if out.finished:
            finished[out.finish_reason] = finished.get(out.finish_reason, 0) + 1
    for name, values in (("pdserve_ttft_seconds", ttft),
                         ("pdserve_time_per_output_token_seconds", tpot)):
        if values:
            hist = metrics.histograms.setdefault(name, Histogram())
            for v in values:
                hist.observe(v)
    if tokens or ttft or tpot:
        metrics.inc("pdserve_generated_tokens_total", tokens)
    for reason, count in finished.items():
        metrics.inc("pdserve_requests_finished_total", count)
        metrics.inc(f"pdserve_requests_finished_{reason}_total", count)


async def track_stream(stream, metrics: Metrics, start: float):
    """Pass a RequestOutput stream through, recording it (`StreamRecorder`)."""
    recorder = StreamRecorder(metrics, start)
    async with aclosing(stream) as outputs:  # closed with this one: see DecodeWorker.generate
        async for out in outputs:
            recorder.observe(out)
            yield out


class FirstOutputTimer:
    """Records into the histogram `name` how long after `start` a request's first output came.
    With `sink`, it stands in front of that sink (outputs pass through it on the engine's step
    thread); without, the caller calls `seen()` for every output of the request's stream."""

    def __init__(self, metrics: Metrics, name: str, start: float,
                 sink: OutputSink | None = None) -> None:
        self.metrics, self.name, self.start, self.sink = metrics, name, start, sink
        self.pending = True

    def seen(self) -> None:
        if self.pending:
            self.pending = False
            self.metrics.observe(self.name, time.perf_counter() - self.start)

    def put(self, out: RequestOutput) -> None:
        self.seen()
        self.sink.put(out)

    def flush(self) -> None:
        self.sink.flush()

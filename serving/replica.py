"""What every serving replica does at start: build its engine from the app config, name itself,
publish its metrics. Shared by the prefill, decode and colocated deployments."""

from __future__ import annotations

import gc
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from engine.async_engine import AsyncEngine
from engine.llm_engine import Engine
from engine.metrics import LOCAL_PREFILL_TTFT, EngineStats, Metrics
from engine.tiny_model import ensure_tiny_model
from kvtransfer import KVTransferLost, model_fingerprint
from serving.batched_runs import BatchedRuns, End, Request
from serving.config import AppConfig
from serving.gpu_sharing import warn_about_sharing
from serving.metrics_hub import start_pushing
from serving.sink_set import SinkSet
from serving.step_sink import StepSink
from serving.token_path import TokenAddress

log = logging.getLogger("pdserve")
T = TypeVar("T")
AUDIT_EVERY_S = 2.0
# What a replica reports to Serve's autoscaler (`record_autoscaling_stats`), read by the SLO
# policy (cluster/slo_autoscaler.py). Gauges are values now; histograms and counters go as
# running totals, which the policy turns into means and rates over Serve's look-back window
# (a per-report mean would lose the intervals in which nothing finished).
AUTOSCALING_GAUGES = ("pdserve_kv_use", "pdserve_num_running", "pdserve_num_waiting",
                      "pdserve_queued_prompt_tokens")
AUTOSCALING_HISTOGRAMS = ("pdserve_ttft_seconds", "pdserve_time_per_output_token_seconds",
                          LOCAL_PREFILL_TTFT)
AUTOSCALING_COUNTERS = ("pdserve_prompt_tokens_total",)


def autoscaling_stats(stats: EngineStats, metrics: Metrics,
                      queued_prompt_tokens: int) -> dict[str, float]:
    """The measures `record_autoscaling_stats` returns (plain floats, as Serve requires)."""
    out = {"pdserve_kv_use": stats.pages_used / max(1, stats.pages_total),
           "pdserve_num_running": float(stats.num_running),
           "pdserve_num_waiting": float(stats.num_waiting),
           "pdserve_queued_prompt_tokens": float(queued_prompt_tokens)}
    for name in AUTOSCALING_HISTOGRAMS:
        h = metrics.histograms.get(name)
        out[f"{name}_sum"] = h.sum if h else 0.0
        out[f"{name}_count"] = float(h.count if h else 0)
    for name in AUTOSCALING_COUNTERS:
        out[name] = float(metrics.counters.get(name, 0))
    return out


def tune_interpreter() -> None:
    """Once the model is loaded: what is alive now (weights' Python objects, Ray, Serve, the
    libraries) lives as long as the replica, so the garbage collector stops scanning it; its
    full collections then cost what the per-step objects cost, not the whole heap.
    `PDSERVE_GIL_SWITCH_MS` sets how long a thread may hold the GIL while another waits
    (Python's default is 5 ms): the step thread waits up to that long whenever the event loop
    or Ray's threads hold it as the GPU finishes."""
    gc.collect()
    gc.freeze()
    switch_ms = os.environ.get("PDSERVE_GIL_SWITCH_MS")
    if switch_ms:
        sys.setswitchinterval(float(switch_ms) / 1e3)


def replica_lost(e: BaseException) -> bool:
    """True for errors that mean another replica should take the call: the actor died or
    cannot be reached, or an object it owned (a KV payload) went with it."""
    from ray.exceptions import ActorUnavailableError, ObjectLostError, RayActorError

    return isinstance(e, RayActorError | ActorUnavailableError | ObjectLostError |
                      KVTransferLost)


def replica_name(role: str) -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return f"{role}-local"


class Replica:
    """The engine, its metrics and fingerprint of one serving replica of `role`."""

    def __init__(self, args: dict, role: str) -> None:
        self.cfg = cfg = AppConfig.from_args(args)
        if cfg.model.path is None:
            ensure_tiny_model()
        model_cfg = cfg.model.to_config()
        # Text and stop strings are the API's work (api/detokenizing_client.py), not the step's;
        # outputs leave in per-step batches (serving/token_mailbox.py), coalesced, if at all,
        # by the ingress.
        engine_cfg = cfg.engine_config(role)
        self.engine = AsyncEngine(Engine(model_cfg, engine_cfg, detokenize=False))
        self.fingerprint = model_fingerprint(model_cfg.path, model_cfg.dtype,
                                             model_cfg.load_format, model_cfg.seed,
                                             model_cfg.quantize)
        self.metrics = Metrics(role, replica_name(role))
        self.metrics.add_counter_source(self.engine.stepper.counters)  # where steps' time goes
        # The first audit runs here, before any request (nothing else touches the engine yet),
        # so a new replica's /metrics says its accounting is sound from the start.
        self.engine.engine.check_integrity()
        self.metrics.set("pdserve_kv_integrity_ok", 1)
        self._last_audit = 0.0
        self.batched = BatchedRuns()
        self.sinks = SinkSet(self.metrics, on_lost=self._abort_all, on_abort=self.batched.abort)
        warn_about_sharing(model_cfg.device, engine_cfg.decode_hold_ms)
        tune_interpreter()
        self._stop_push = start_pushing(self.snapshot)
        log.info("%s replica %s ready: %d KV pages", role, self.metrics.replica,
                 self.engine.stats().pages_total)

    async def run_into(self, mailbox: TokenAddress, request_id: str,
                       generate: Callable[[StepSink], AsyncIterator]) -> None:
        """Run `generate(sink)` (a request's stream in sink mode) with its outputs going to
        `mailbox`, one batch per engine step; returns when the request ends. Raises if it ended
        without a last output (aborted here, e.g. because its mailbox was lost), so that the
        ingress does not wait for one."""
        sink = await self.sinks.get(mailbox)
        finished = False
        with sink.opened(request_id):
            async for out in generate(sink):
                finished = out.finished
        if not finished:
            raise RuntimeError(f"request {request_id} was aborted by the serving replica")

    async def run_many(self, requests: list[Request], mailbox: TokenAddress,
                       generate: Callable[[Request, StepSink], AsyncIterator],
                       ) -> AsyncIterator[int | list[End]]:
        """Many requests in one Serve call (serving/batched_runs.py), each run as `run_into`
        runs one. The sink is connected first: the requests' aborts come back over it."""
        await self.sinks.get(mailbox)

        def run(request: Request):
            return self.run_into(mailbox, request[2], lambda sink: generate(request, sink))

        async for item in self.batched.run_many(requests, run):
            yield item

    async def call_one(self, address: TokenAddress, request_id: str,
                       run: Callable[[], Awaitable[T]]) -> T:
        """`await run()`, a Serve call's value (a prefill's result), with the request open on
        the caller's token socket at `address` meanwhile: if the caller goes (the socket
        closes: its replica died), the request is aborted, instead of running on for nobody
        and leaving its KV unreceived. The socket carries only aborts."""
        sink = await self.sinks.get(address)
        with sink.opened(request_id):
            return await run()

    async def stream_one(self, address: TokenAddress, request_id: str,
                         stream: Callable[[], AsyncIterator[T]]) -> AsyncIterator[T]:
        """`stream()`'s items, a streaming Serve call's (a layer-streamed prefill's handle,
        then its result), with the request open on the caller's socket meanwhile, as
        `call_one`."""
        sink = await self.sinks.get(address)
        with sink.opened(request_id):
            async for item in stream():
                yield item

    async def call_many(self, requests: list[Request], address: TokenAddress,
                        run: Callable[[Request], Awaitable[object]],
                        ) -> AsyncIterator[int | list[End]]:
        """Many requests in one Serve call whose values go back in the call's stream, each
        run as `call_one` runs one. The caller's socket is connected first, as for
        `run_many`: the requests' aborts come over it."""
        await self.sinks.get(address)

        def run_open(request: Request) -> Awaitable[object]:
            return self.call_one(address, request[2], lambda: run(request))

        async for item in self.batched.run_many(requests, run_open):
            yield item

    def _abort_all(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.engine.abort(request_id)

    def snapshot(self) -> dict:
        """Called from the metrics thread; also queues a page-accounting audit for the step
        thread."""
        self.metrics.record_engine(self.engine.stats())
        now = time.monotonic()
        # The audit walks every page: run it while idle (nothing waits for the steps then), and
        # not too often.
        if not self.engine.has_unfinished() and now - self._last_audit >= AUDIT_EVERY_S:
            self._last_audit = now
            self.engine.run_soon(self._audit)
        return self.metrics.snapshot()

    def _audit(self) -> None:
        """The engine's page-accounting check, between two steps; published as a gauge."""
        try:
            self.engine.engine.check_integrity()
            ok = 1
        except AssertionError:
            log.exception("KV page accounting check failed")
            self.metrics.inc("pdserve_kv_integrity_failures_total")
            ok = 0
        self.metrics.set("pdserve_kv_integrity_ok", ok)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve calls this on its own schedule (the deployments' `record_autoscaling_stats`)."""
        return autoscaling_stats(self.engine.stats(), self.metrics, self._queued_prompt_tokens())

    def _queued_prompt_tokens(self) -> int:
        """Prompt tokens not yet prefilled here. Read between steps or not (a gauge may be a
        step stale): list() copies the scheduler's queues in one call, under the GIL."""
        sched = self.engine.engine.scheduler
        return sum(r.num_prompt_tokens - min(r.num_computed_tokens, r.num_prompt_tokens)
                   for r in list(sched.waiting) + list(sched.running))

    def health(self) -> dict:
        stats = self.engine.stats()
        return {"role": self.metrics.role, "replica": self.metrics.replica,
                "pages_used": stats.pages_used, "pages_total": stats.pages_total}

    async def check_integrity(self) -> dict:
        stats = await self.engine.check_integrity()
        return {"pages_used": stats.pages_used, "pages_total": stats.pages_total,
                "running": stats.num_running, "waiting": stats.num_waiting}

    def close(self) -> None:
        """Stop publishing metrics (the replica is shutting down)."""
        self._stop_push.set()

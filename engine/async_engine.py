"""AsyncEngine: the engine's step loop in its own thread, with one output stream per request.

The step thread applies pending adds and aborts between steps (the engine is never mutated
while a step runs) and runs steps back to back while there is work; it leaves when idle and is
started again by the next request. Streams live on the asyncio loops of their callers; the
thread hands them outputs with one `call_soon_threadsafe` per loop per step. Cancelling a
stream (client gone) aborts its request, which frees its pages before the next step.

Why a thread of its own rather than a step per `asyncio.to_thread` call: between two steps the
old loop had to be woken on the event loop (behind whatever else the serving replica's loop was
doing), run every ready callback and hand the next step to a pool thread; on the H200 the GPU
sat idle for those hand-offs (docs/benchmarks.md, the token path).

The streams, and the `OutputSink`s that take a request's outputs in place of its stream, are
engine/output_streams.py's.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from engine.kv_stream import LayerwiseExport
from engine.llm_engine import Engine
from engine.metrics import EngineStats
from engine.output_streams import OutputSink, OutputStreams, call_soon
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.scheduler import Reservation
from engine.step_log import StepLog

log = logging.getLogger(__name__)
T = TypeVar("T")
IDLE_EXIT_S = 1.0  # the step thread leaves after this long without work
# The AsyncEngine that drives each Engine: only its thread may step it (a test may wrap one
# Engine in a new AsyncEngine while the old one's thread is still winding down).
_DRIVERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class AsyncEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        _DRIVERS[engine] = self
        self._streams = OutputStreams(on_abandon=self.abort)
        self._cond = threading.Condition()
        self._pending: list[tuple[str, Callable[[], None]]] = []  # under _cond
        self._running = False  # a step thread is alive (under _cond)
        self._closed = False
        self._thread: threading.Thread | None = None
        self.num_steps = 0
        # Where the step thread's working time goes: inside `Engine.step`, and in its whole
        # rounds (actions + step + hand-off) that stepped; the difference is the host time the
        # serving path adds between two steps. Against the device's time in the steps
        # (`device_seconds`), the rounds show how long the GPU sat idle between steps.
        self.step_seconds = 0.0
        self.round_seconds = 0.0
        self.action_seconds = 0.0  # of which applying adds, admits, aborts, calls
        self.device_seconds = 0.0  # the GPU's time in the steps that ended (0 off CUDA)
        self._step_log = StepLog.from_env()  # PDSERVE_STEP_LOG: a line per step

    def close(self) -> None:
        """Stop the step thread: it finishes the step it is in and applies the actions (adds,
        aborts) submitted so far, then leaves; returns when it has. A later request starts a
        new one."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    # -- what the roles call --------------------------------------------------------------
    @property
    def device(self):
        return self.engine.device

    @property
    def export_stream(self):
        """The CUDA stream that exported KV is read out on (None off CUDA): engine/kv_export.py."""
        return self.engine.export_stream

    @property
    def prefix_caching(self) -> bool:
        """Whether the engine keeps prompt pages in its prefix cache for later requests."""
        return self.engine.cfg.enable_prefix_caching

    @property
    def kv_layout(self) -> tuple[object, int]:
        """(torch dtype, page size) of the KV pool: what a transferred payload must match."""
        return self.engine.pool.dtype, self.engine.cfg.page_size

    def kv_shape(self, num_pages: int) -> tuple[int, ...]:
        """Shape of an export of `num_pages` pages: [L, num_pages, 2, page_size, Hkv, D]."""
        return self.engine.pool.export_shape(num_pages)

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        self.engine.validate(prompt_ids, params)

    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str, kv_export_from: int | None = None,
                       sink: OutputSink | None = None, kv_stream: LayerwiseExport | None = None,
                       ) -> AsyncIterator[RequestOutput]:
        """Run a request here; with `kv_export_from`, its last output carries the prompt's KV
        (and `kv_stream` gets it layer by layer, as computed). With `sink`, outputs go there and
        this stream yields only the last one."""
        prompt_ids = self.engine.tokenize(prompt)
        self.engine.validate(prompt_ids, params)  # raises ValueError before anything is queued
        stream = self._streams.open(request_id, sink)
        self._submit(request_id, lambda: self.engine.add_request(prompt_ids, params, request_id,
                                                                 kv_export_from, kv_stream))
        async for out in self._streams.drain(request_id, stream):
            yield out

    async def reserve(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                      hashes: list[int] | None = None) -> Reservation | None:
        """Pages for a prompt whose KV comes from another replica (`Engine.reserve`). A caller
        cancelled meanwhile leaves nothing reserved; otherwise `abort` undoes it, carried out
        once `end_import` says that no transport writes into it (with a PageImport out)."""
        def undo(_) -> None:  # no transport was given the reservation
            self.engine.end_import(request_id)
            self.engine.abort(request_id)

        return await self.call(lambda: self.engine.reserve(request_id, prompt_ids, params, hashes),
                               undo=undo)

    def end_import(self, request_id: str) -> None:
        """The transport is done with request_id's reservation (`Engine.end_import`); safe from
        any thread, queued behind the actions submitted before it."""
        self._submit(request_id, lambda: self.engine.end_import(request_id))

    async def admit_prefilled(self, request_id: str, first_block: int, kv_data, first_token: int,
                              logprob=None, num_cached_tokens: int = 0,
                              sink: OutputSink | None = None,
                              prompt_logprobs: list | None = None,
                              admitted: Callable[[], None] | None = None,
                              ) -> AsyncIterator[RequestOutput]:
        """Stream a reserved request whose prompt KV from `first_block` on arrived from a
        prefill replica; the first output is the token prefill sampled. `sink` as in
        `generate`. `admitted()` runs on the caller's loop once the admission has run on the
        step thread (the prompt's pages are in the prefix cache then), or failed."""
        stream = self._streams.open(request_id, sink)

        def admit() -> None:
            nonlocal kv_data
            try:
                out = self.engine.admit_prefilled(request_id, first_block, kv_data, first_token,
                                                  logprob, num_cached_tokens, prompt_logprobs)
                if out is not None:
                    self._streams.deliver(out)
                else:  # aborted meanwhile: the stream ends as aborted
                    self._streams.end(request_id)
            finally:
                kv_data = None  # a mapped sender buffer (cuda_ipc) is released once copied
                if admitted is not None:
                    call_soon(stream.loop, admitted)

        self._submit(request_id, admit)
        async for out in self._streams.drain(request_id, stream):
            yield out

    def abort(self, request_id: str) -> None:
        """End request_id wherever it is (queued, running, reserved) and free its pages. Safe
        from any thread."""
        self._submit(request_id, lambda: self.engine.abort(request_id))
        self._streams.end(request_id)

    def num_open_streams(self) -> int:
        """Requests whose output stream is open (submitted and not yet ended or abandoned)."""
        return len(self._streams)

    def has_stream(self, request_id: str) -> bool:
        return request_id in self._streams

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def cached_prefix_tokens(self, prompt_ids: list[int],
                             hashes: list[int] | None = None) -> int:
        """Leading prompt tokens this engine's prefix cache holds now (`hashes`: the prompt's
        block hashes, where the caller has them). Read off the step thread without waiting for
        it (dict reads, atomic under the GIL), so only a hint: the step thread may evict those
        pages, or cache more, before the request runs."""
        return self.engine.scheduler.kv.cached_prefix_tokens(prompt_ids, hashes)

    def free_pages_hint(self) -> int:
        """Pages a reservation could take now (free, or cached and evictable); read off the
        step thread as `cached_prefix_tokens` is, so only a hint."""
        return self.engine.allocator.num_free

    async def check_integrity(self) -> EngineStats:
        """The page-accounting audit, between two steps; returns the stats it saw."""
        def audit() -> EngineStats:
            self.engine.check_integrity()
            return self.engine.stats()

        return await self.call(audit)

    def has_unfinished(self) -> bool:
        return self.engine.has_unfinished()

    # -- running code between steps ----------------------------------------------------------
    def run_soon(self, fn: Callable[[], None]) -> None:
        """Run fn on the step thread between two steps; from any thread, nothing awaited."""
        self._submit("", fn)

    async def call(self, fn: Callable[[], T], undo: Callable[[T], object] | None = None) -> T:
        """Run fn between two steps (where the engine may be mutated) and return its result.

        If the caller is cancelled before fn's result reaches it, `undo(result)` runs on the
        step thread: right after fn, in the same slot, if the cancellation came first, else
        between the next two steps. So no effect outlives a cancelled caller."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def settle(result: T) -> None:  # on the caller's loop
            if not fut.cancelled():
                fut.set_result(result)
            elif undo is not None:
                self._submit("", lambda: undo(result))

        def fail(e: Exception) -> None:
            if not fut.cancelled():
                fut.set_exception(e)

        def run() -> None:
            try:
                result = fn()
            except Exception as e:
                call_soon(loop, fail, e)
                return
            if fut.cancelled() or not call_soon(loop, settle, result):
                if undo is not None:
                    undo(result)

        self._submit("", run)
        return await fut

    # -- internals ------------------------------------------------------------------------
    def _submit(self, request_id: str, fn: Callable[[], None]) -> None:
        with self._cond:
            self._pending.append((request_id, fn))
            if self._running:
                self._cond.notify()
                return
            self._running = True
            self._closed = False
            self._thread = threading.Thread(target=self._run, name="pdserve-step", daemon=True)
            self._thread.start()

    def _next_actions(self) -> list[tuple[str, Callable[[], None]]] | None:
        """The actions to apply before the next step; None when the thread should leave:
        closed (once what was submitted before is applied), replaced as the engine's driver, or
        idle for IDLE_EXIT_S."""
        with self._cond:
            idle = not self._pending and not self._has_work()
            if idle:
                self._cond.wait_for(lambda: self._pending or self._closed, IDLE_EXIT_S)
            # After an idle wait only a submitted action keeps the thread: work that appeared
            # in the engine meanwhile is someone else's (a test's LLM on the same Engine).
            if _DRIVERS.get(self.engine) is not self or not self._pending and (
                    self._closed or idle or not self._has_work()):
                self._running = False
                return None
            pending, self._pending = self._pending, []
            return pending

    def _has_work(self) -> bool:
        """Requests of this AsyncEngine's streams to step. Every engine request of ours has an
        open stream (a stream that ends early aborts its request), so with no stream open the
        engine's remaining work is someone else's (a test driving the same Engine through
        `LLM`), which this thread must not step."""
        return bool(self._streams) and self.engine.has_unfinished()

    def _run(self) -> None:
        try:
            while (pending := self._next_actions()) is not None:
                start = time.perf_counter()
                self._apply(pending)
                if not self._closed and self._has_work():
                    step_s = self._step()
                    self.round_seconds += time.perf_counter() - start
                    if self._step_log is not None and step_s is not None:
                        # The round's start on the wall clock: other processes' logs line up.
                        self._step_log.record(time.time() - (time.perf_counter() - start),
                                              len(pending), step_s, self.engine.scheduler,
                                              self.engine.step_device_s)
        except BaseException:  # a bug here must not leave the streams waiting forever
            log.exception("engine step thread failed")
            with self._cond:
                self._running = False
            self._fail_all(RuntimeError("the engine step thread failed"))
            raise

    def _apply(self, pending: list[tuple[str, Callable[[], None]]]) -> None:
        start = time.perf_counter()
        for request_id, fn in pending:
            try:
                fn()
            except Exception as e:  # a bad request must not stop the loop
                log.exception("engine action for %s failed", request_id)
                self._streams.fail(request_id, e)
        self.action_seconds += time.perf_counter() - start
        self._streams.flush()  # first tokens of the requests admitted just now

    def _step(self) -> float | None:
        """One engine step and the hand-off of its outputs; returns the step's seconds, or None
        when it failed (its requests failed with it)."""
        if self._step_log is not None:
            self._step_log.start_step()
        start = time.perf_counter()
        try:
            outputs = self.engine.step()
        except Exception as e:
            log.exception("engine step failed; failing its requests")
            self._fail_all(e)
            return None
        step_s = time.perf_counter() - start
        if self._step_log is not None:
            self._step_log.end_step()
        self.step_seconds += step_s
        self.device_seconds += self.engine.step_device_s or 0.0
        self.num_steps += 1
        for out in outputs:
            self._streams.deliver(out)
        self._streams.flush()
        return step_s

    def _fail_all(self, error: BaseException) -> None:
        for request_id in self._streams.ids():
            self.engine.abort(request_id)
            self._streams.fail(request_id, error)
        self._streams.flush()

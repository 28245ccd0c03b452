"""AsyncEngine: the engine's step loop in its own thread, with one output stream per request.

The step thread (engine/step_thread.py) applies pending adds and aborts between steps (the
engine is never mutated while a step runs) and runs steps back to back while there is work; it
leaves when idle and is started again by the next request. Streams live on the asyncio loops of
their callers; the thread hands them outputs with one `call_soon_threadsafe` per loop per step.
Cancelling a stream (client gone) aborts its request, which frees its pages before the next
step.

The streams, and the `OutputSink`s that take a request's outputs in place of its stream, are
engine/output_streams.py's.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from engine.kv_stream import LayerwiseExport
from engine.llm_engine import Engine
from engine.metrics import EngineStats
from engine.output_streams import OutputSink, OutputStreams, call_soon
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.scheduler import Reservation
from engine.step_thread import StepThread

T = TypeVar("T")


class AsyncEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._streams = OutputStreams(on_abandon=self.abort)
        # the step thread, and where its time goes (num_steps, step_/round_/action_/
        # device_seconds): engine/step_thread.py
        self.stepper = StepThread(engine, self._streams)

    def close(self) -> None:
        """Stop the step thread: it finishes the step it is in and applies the actions (adds,
        aborts) submitted so far, then leaves; returns when it has. A later request starts a
        new one."""
        self.stepper.close()

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
        self.stepper.submit(request_id, lambda: self.engine.add_request(
            prompt_ids, params, request_id, kv_export_from, kv_stream))
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
        self.stepper.submit(request_id, lambda: self.engine.end_import(request_id))

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

        self.stepper.submit(request_id, admit)
        async for out in self._streams.drain(request_id, stream):
            yield out

    def abort(self, request_id: str) -> None:
        """End request_id wherever it is (queued, running, reserved) and free its pages. Safe
        from any thread."""
        self.stepper.submit(request_id, lambda: self.engine.abort(request_id))
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
        self.stepper.submit("", fn)

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
                self.stepper.submit("", lambda: undo(result))

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

        self.stepper.submit("", run)
        return await fut

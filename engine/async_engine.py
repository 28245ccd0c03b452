"""AsyncEngine: the engine's step loop as an asyncio task, with one output stream per request.

The loop applies pending adds and aborts between steps (the engine is never mutated while a
step runs) and runs each step in a worker thread so the event loop keeps serving streams.
Cancelling a stream (client gone) aborts its request, which frees its pages before the next step.

A request started with an `OutputSink` hands every output to the sink instead of its stream
(which then yields only the last output, or raises): the loop calls `put` per output and
`flush` once per step per sink, so whoever sends outputs elsewhere sends one message per step
for all its requests, not one per token per request.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from typing import Protocol, TypeVar

from engine.kv_stream import LayerwiseExport
from engine.llm_engine import Engine
from engine.metrics import EngineStats
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.scheduler import Reservation

log = logging.getLogger(__name__)
T = TypeVar("T")


class OutputSink(Protocol):
    """Receives the outputs of many requests; `flush` ends each step (and each batch of
    between-step admissions) that put anything."""

    def put(self, out: RequestOutput) -> None: ...

    def flush(self) -> None: ...


class AsyncEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._streams: dict[str, asyncio.Queue] = {}
        self._sinks: dict[str, OutputSink] = {}
        self._dirty: dict[int, OutputSink] = {}  # sinks given outputs since their last flush
        self._pending: list[tuple[str, Callable[[], None]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.num_steps = 0

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop that runs the step loop (None before the first request)."""
        return None if self._task is None else self._task.get_loop()

    def start(self) -> None:
        if self._task is None or self._task.done():
            # The loop outlives the request that starts it: it must not run in that request's
            # context (Ray ties the calls a request's context makes, e.g. a mailbox put, to the
            # request, and cancels them with it).
            self._task = asyncio.get_running_loop().create_task(self._loop(),
                                                                context=contextvars.Context())

    # -- what the roles call --------------------------------------------------------------
    @property
    def device(self):
        return self.engine.device

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
        queue = self._open(request_id, sink)
        self._submit(request_id, lambda: self.engine.add_request(prompt_ids, params, request_id,
                                                                 kv_export_from, kv_stream))
        async for out in self._drain(request_id, queue):
            yield out

    async def reserve(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                      ) -> Reservation | None:
        """Pages for a prompt whose KV comes from another replica (`Engine.reserve`). A caller
        cancelled meanwhile leaves nothing reserved; otherwise `abort` undoes it."""
        return await self.call(lambda: self.engine.reserve(request_id, prompt_ids, params),
                               undo=lambda _: self.engine.abort(request_id))

    async def admit_prefilled(self, request_id: str, first_block: int, kv_data, first_token: int,
                              logprob=None, num_cached_tokens: int = 0,
                              sink: OutputSink | None = None,
                              prompt_logprobs: list | None = None,
                              ) -> AsyncIterator[RequestOutput]:
        """Stream a reserved request whose prompt KV from `first_block` on arrived from a
        prefill replica; the first output is the token prefill sampled. `sink` as in
        `generate`."""
        queue = self._open(request_id, sink)

        def admit() -> None:
            nonlocal kv_data
            try:
                out = self.engine.admit_prefilled(request_id, first_block, kv_data, first_token,
                                                  logprob, num_cached_tokens, prompt_logprobs)
                if out is not None:
                    self._deliver(out)
                else:  # aborted meanwhile: the stream ends as aborted
                    self._end_stream(request_id)
            finally:
                kv_data = None  # a mapped sender buffer (cuda_ipc) is released once copied

        self._submit(request_id, admit)
        async for out in self._drain(request_id, queue):
            yield out

    def abort(self, request_id: str) -> None:
        """End request_id wherever it is (queued, running, reserved) and free its pages."""
        self._submit(request_id, lambda: self.engine.abort(request_id))
        self._end_stream(request_id)

    def _end_stream(self, request_id: str) -> None:
        """The request's stream ends, as aborted (no finished output)."""
        queue = self._streams.pop(request_id, None)
        if queue is not None:
            queue.put_nowait(None)

    def stats(self) -> EngineStats:
        return self.engine.stats()

    async def check_integrity(self) -> EngineStats:
        """The page-accounting audit, between two steps; returns the stats it saw."""
        def audit() -> EngineStats:
            self.engine.check_integrity()
            return self.engine.stats()

        return await self.call(audit)

    def has_unfinished(self) -> bool:
        return self.engine.has_unfinished()

    # -- running code between steps ----------------------------------------------------------
    async def call(self, fn: Callable[[], T], undo: Callable[[T], object] | None = None) -> T:
        """Run fn between two steps (where the engine may be mutated) and return its result.

        If the caller is cancelled before fn has run, fn still runs and `undo(result)` runs
        right after it, in the same slot; so no effect outlives a cancelled caller, whatever
        else was queued meanwhile."""
        self.start()
        fut = asyncio.get_running_loop().create_future()

        def run() -> None:
            try:
                result = fn()
            except Exception as e:
                if not fut.cancelled():
                    fut.set_exception(e)
                return
            if fut.cancelled():
                if undo is not None:
                    undo(result)
                return
            fut.set_result(result)

        self._submit("", run)
        return await fut

    # -- internals ------------------------------------------------------------------------
    def _open(self, request_id: str, sink: OutputSink | None = None) -> asyncio.Queue:
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already running")
        self.start()
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = queue
        if sink is not None:
            self._sinks[request_id] = sink
        return queue

    def _deliver(self, out: RequestOutput) -> None:
        """Hand an output to its sink (the stream wakes only for the last one) or its stream."""
        sink = self._sinks.get(out.request_id)
        if sink is not None:
            sink.put(out)
            self._dirty[id(sink)] = sink
            if not out.finished:
                return
        queue = self._streams.get(out.request_id)
        if queue is not None:
            queue.put_nowait(out)

    def _flush_sinks(self) -> None:
        dirty, self._dirty = self._dirty, {}
        for sink in dirty.values():
            try:
                sink.flush()
            except Exception:  # one consumer's failure must not stop the loop
                log.exception("output sink flush failed")

    async def _drain(self, request_id: str, queue: asyncio.Queue
                     ) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                # A consumer that fell behind gets what piled up as one output: under load
                # this cuts per-message costs downstream (Serve streams, SSE chunks).
                merged = None
                for item in items:
                    if item is None or isinstance(item, BaseException):
                        if merged is not None:
                            yield merged
                        if item is None:  # aborted
                            return
                        raise item
                    merged = item if merged is None else merge_outputs(merged, item)
                finished = merged.finished
                yield merged
        finally:
            if not finished:  # consumer went away (disconnect, timeout): free its pages
                self.abort(request_id)
            self._streams.pop(request_id, None)
            self._sinks.pop(request_id, None)

    def _submit(self, request_id: str, fn: Callable[[], None]) -> None:
        self._pending.append((request_id, fn))
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            if not self._pending and not self.engine.has_unfinished():
                self._wake.clear()
                await self._wake.wait()
            pending, self._pending = self._pending, []
            for request_id, fn in pending:
                try:
                    fn()
                except Exception as e:  # a bad request must not stop the loop
                    log.exception("engine action for %s failed", request_id)
                    queue = self._streams.pop(request_id, None)
                    if queue is not None:
                        queue.put_nowait(e)
            self._flush_sinks()  # first tokens of the requests admitted just now
            if not self.engine.has_unfinished():
                continue
            try:
                outputs = await asyncio.to_thread(self.engine.step)
            except Exception as e:
                log.exception("engine step failed; failing its requests")
                for rid in list(self._streams):
                    self.engine.abort(rid)
                    self._streams.pop(rid).put_nowait(e)
                continue
            self.num_steps += 1
            for out in outputs:
                self._deliver(out)
            self._flush_sinks()
            await asyncio.sleep(0)  # let streams flush between steps


def merge_outputs(a: RequestOutput, b: RequestOutput) -> RequestOutput:
    """b follows a in the same request's stream: one output carrying both."""
    return dataclasses.replace(
        b, new_token_ids=a.new_token_ids + b.new_token_ids, new_text=a.new_text + b.new_text,
        new_logprobs=a.new_logprobs + b.new_logprobs,
        prompt_logprobs=a.prompt_logprobs if a.prompt_logprobs is not None else b.prompt_logprobs)

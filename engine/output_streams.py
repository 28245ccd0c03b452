"""OutputStreams: one output stream per request, read on its caller's event loop and fed from the
engine's step thread (engine/async_engine.py).

Contract:
- `open(request_id, sink)` on the caller's loop, before the request is submitted; a second
  stream for a running id is a ValueError. `drain(request_id, stream)` is the caller's async
  iterator over it; when the caller stops reading before the last output (client gone,
  timeout, cancellation), `on_abandon(request_id)` runs (the engine aborts the request and
  frees its pages) and the stream is closed.
- On the step thread: `deliver(out)` and `fail(request_id, error)` queue a stream's next item;
  `flush()` hands everything queued to the readers, with one `call_soon_threadsafe` per event
  loop, so a step's hand-off costs one wake-up per loop, not one per request. `end(request_id)`
  (any thread) closes a stream as aborted: it yields nothing more.
- A stream opened with an `OutputSink` hands every output to the sink (`put`, then one `flush`
  per `flush()` that gave it anything) and yields only the last output, or the error: whoever
  sends outputs elsewhere sends one message per step for all its requests.
- A reader that fell behind gets what piled up as one output (`merge_outputs`): under load this
  cuts per-message costs downstream (Serve streams, SSE chunks).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from engine.outputs import RequestOutput

log = logging.getLogger(__name__)


class OutputSink(Protocol):
    """Receives the outputs of many requests, on the step thread; `flush` ends each step (and
    each batch of between-step admissions) that put anything."""

    def put(self, out: RequestOutput) -> None: ...

    def flush(self) -> None: ...


@dataclass(eq=False)
class Stream:
    """A request's output queue, on the event loop of the caller that reads it. Items: a
    RequestOutput, an exception (raised to the reader), or None (ended as aborted)."""

    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    sink: OutputSink | None = None

    def post(self, item: object) -> None:
        """Put `item` into the queue from any thread."""
        try:
            if asyncio.get_running_loop() is self.loop:
                self.queue.put_nowait(item)
                return
        except RuntimeError:  # no loop running in this thread
            pass
        call_soon(self.loop, self.queue.put_nowait, item)


def call_soon(loop: asyncio.AbstractEventLoop, fn: Callable, *args: object) -> bool:
    """`loop.call_soon_threadsafe(fn, *args)`; False if the loop is closed (nobody waits)."""
    try:
        loop.call_soon_threadsafe(fn, *args)
        return True
    except RuntimeError:
        return False


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


class OutputStreams:
    def __init__(self, on_abandon: Callable[[str], None]) -> None:
        self._on_abandon = on_abandon
        self._streams: dict[str, Stream] = {}
        # Touched by the step thread only:
        self._dirty: dict[int, OutputSink] = {}  # sinks given outputs since their last flush
        self._posts: list[tuple[Stream, object]] = []  # stream items queued for `flush`

    def __len__(self) -> int:
        """Streams open now."""
        return len(self._streams)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._streams

    def ids(self) -> list[str]:
        return list(self._streams)

    def open(self, request_id: str, sink: OutputSink | None = None) -> Stream:
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already running")
        stream = Stream(asyncio.Queue(), asyncio.get_running_loop(), sink)
        self._streams[request_id] = stream
        return stream

    def end(self, request_id: str) -> None:
        """The request's stream ends, as aborted (no finished output)."""
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.post(None)

    def deliver(self, out: RequestOutput) -> None:
        """(Step thread.) Hand an output to its sink (the stream gets only the last one) or to
        its stream."""
        stream = self._streams.get(out.request_id)
        if stream is None:
            return
        if stream.sink is not None:
            stream.sink.put(out)
            self._dirty[id(stream.sink)] = stream.sink
            if not out.finished:
                return
        self._posts.append((stream, out))

    def fail(self, request_id: str, error: BaseException) -> None:
        """(Step thread.) The request's stream raises `error` to its reader, after what was
        delivered before."""
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            self._posts.append((stream, error))

    def flush(self) -> None:
        """(Step thread.) Sinks first, so that a request's last batch is on its way before its
        stream (and so its Serve call) ends; then one hand-off per event loop."""
        dirty, self._dirty = self._dirty, {}
        for sink in dirty.values():
            try:
                sink.flush()
            except Exception:  # one consumer's failure must not stop the loop
                log.exception("output sink flush failed")
        posts, self._posts = self._posts, []
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for stream, item in posts:
            by_loop.setdefault(stream.loop, []).append((stream.queue, item))
        for loop, items in by_loop.items():
            call_soon(loop, _put_all, items)

    async def drain(self, request_id: str, stream: Stream) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                items = [await stream.queue.get()]
                while not stream.queue.empty():
                    items.append(stream.queue.get_nowait())
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
            if not finished:  # the reader went away (disconnect, timeout): free its pages
                self._on_abandon(request_id)
            self._streams.pop(request_id, None)


def merge_outputs(a: RequestOutput, b: RequestOutput) -> RequestOutput:
    """b follows a in the same request's stream: one output carrying both."""
    return b.evolve(
        new_token_ids=a.new_token_ids + b.new_token_ids, new_text=a.new_text + b.new_text,
        new_logprobs=a.new_logprobs + b.new_logprobs,
        prompt_logprobs=a.prompt_logprobs if a.prompt_logprobs is not None else b.prompt_logprobs)

"""One request through a serving deployment's `run` method (or a SubmitBatcher's,
serving/batched_submit.py), its outputs through the ingress's token socket or mailbox
(serving/token_socket.py, serving/token_mailbox.py): the call carries the request, its
cancellation and its end; the tokens arrive in per-step batches, fanned out by the reader.

The stream ends with the request's last output, or raises the error the call ended with (a
replica that died, a ValueError for bad input, a timeout when nothing arrives for `timeout_s`).
Leaving early cancels the call, which aborts the request on the replica.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from engine.hop_log import hop
from engine.output_streams import merge_outputs
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from serving.token_path import TokenReader


class Coalescing:
    """While more than `busy_streams` streams are open, each hands out its tokens at most every
    `interval_s` (what piled up, merged): fewer, larger SSE events. Off when interval_s is 0."""

    def __init__(self, interval_s: float = 0.0, busy_streams: int = 8) -> None:
        self.interval_s, self.busy_streams = interval_s, busy_streams
        self.open = 0

    @property
    def active(self) -> bool:
        return self.interval_s > 0 and self.open > self.busy_streams


class _CallEnded:
    """Queued when the request's call ends with an error: raised once the outputs that came
    before it are handed out."""

    def __init__(self, call: asyncio.Future) -> None:
        self.call = call


async def mailbox_call(run: Callable[..., Any], reader: TokenReader, prompt_ids: list[int],
                       params: SamplingParams, request_id: str, timeout_s: float,
                       coalescing: Coalescing | None = None) -> AsyncIterator[RequestOutput]:
    coalescing = coalescing or Coalescing()
    queue = reader.open(request_id)
    hop(request_id, "ingress.call")
    # `handle.run.remote` or `SubmitBatcher.run`: an awaitable with `cancel()`.
    response = run(prompt_ids, params, request_id, reader.mailbox)
    call = asyncio.ensure_future(response)

    def ended(f: asyncio.Future) -> None:
        # Retrieved here (a call cancelled below ends in Serve's RequestCancelledError), so it
        # is not logged as "exception was never retrieved". A call that ends well queues
        # nothing: its last output is on its way through the mailbox.
        if not f.cancelled() and f.exception() is not None:
            queue.put_nowait(_CallEnded(f))

    call.add_done_callback(ended)
    finished = seen = False
    coalescing.open += 1
    idle = IdleTimer(queue, timeout_s)
    try:
        while not finished:
            out = await _next(queue)
            idle.touch()
            if not seen:
                seen = True
                hop(request_id, "ingress.first")
            if coalescing.active:
                while not queue.empty() and not out.finished:
                    more = _output(queue.get_nowait())
                    out = merge_outputs(out, more)
            finished = out.finished
            yield out
            if not finished and coalescing.active:
                await asyncio.sleep(coalescing.interval_s)
    finally:
        idle.cancel()
        coalescing.open -= 1
        reader.close(request_id)
        if not finished:
            response.cancel()  # aborts the request on the replica
        if not call.done():
            call.cancel()


async def _next(queue: asyncio.Queue) -> RequestOutput:
    """The next output; the call's error if it ended in one before its outputs did, or the
    idle timer's TimeoutError."""
    return _output(queue.get_nowait() if not queue.empty() else await queue.get())


class IdleTimer:
    """Queues a TimeoutError on `queue` once the stream has been idle for `timeout_s`: nothing
    taken from the queue and nothing waiting in it. One timer per stream, re-armed only when it
    fires; a stream marks progress with `touch()`, one clock read. (An `asyncio.timeout` around
    every wait cost ~10 us per token on a 2-core machine, ~3% of the ingress replica's CPU per
    token, `bench.token_path_cost`.)"""

    def __init__(self, queue: asyncio.Queue, timeout_s: float) -> None:
        self.queue, self.timeout_s = queue, timeout_s
        self.loop = asyncio.get_running_loop()
        self.last = self.loop.time()
        self._handle = self.loop.call_at(self.last + timeout_s, self.fire)

    def touch(self) -> None:
        self.last = self.loop.time()

    def fire(self) -> None:
        now = self.loop.time()
        if not self.queue.empty():  # outputs arrived and wait for a slow client: not idle
            self.last = now
        if now < self.last + self.timeout_s:
            self._handle = self.loop.call_at(self.last + self.timeout_s, self.fire)
            return
        self.queue.put_nowait(TimeoutError(
            f"no output from the serving replica for {self.timeout_s:.0f} s"))

    def cancel(self) -> None:
        self._handle.cancel()


def _output(item: object) -> RequestOutput:
    if isinstance(item, _CallEnded):
        item.call.result()  # raises the replica's error
    if isinstance(item, BaseException):  # the mailbox was lost (Fanout.fail), or idle
        raise item
    return item  # type: ignore[return-value]

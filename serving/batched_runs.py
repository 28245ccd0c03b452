"""A serving replica's side of `run_many`: many requests in one Serve call (api/batched_submit.py
is the ingress's side).

Every Serve call costs the serving replica Python work under the GIL (Serve's request wrapper,
Ray's deserialization of the call), which the engine's step thread waits for: when a wave of
128 requests arrived as 128 calls, the wave's first steps spent ~115-130 ms off the CPU
(docs/benchmarks.md, step logs of run 89). A call of many requests pays that once.

The call is a stream. It yields the number of requests accepted once each has been started,
then, as requests end, lists of `(request_id, error)`: error is None when the request's last
output went out through the token path, else `(kind, message)`, kind "ValueError" for input the
engine refused (the API answers 4xx) or "RuntimeError". A request's outputs travel through the
token path, as with `run`. Its abort comes as `abort(request_id)` (the token socket's abort
frames), and cancels that request's task as Serve's cancellation cancels a `run` call. The
call's own cancellation (its ingress went away) cancels all of its requests' tasks.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable

from engine.sampling_params import SamplingParams

Request = tuple[list[int], SamplingParams, str]  # prompt ids, sampling params, request id
End = tuple[str, tuple[str, str] | None]  # request id, error (kind, message) or None


class BatchedRuns:
    """The open requests of a replica's `run_many` calls, by request id."""

    def __init__(self) -> None:
        self.tasks: dict[str, asyncio.Task] = {}

    async def run_many(self, requests: list[Request], run: Callable[[Request], Awaitable[None]],
                       ) -> AsyncIterator[int | list[End]]:
        """`run(request)` runs one request (the replica's `run`, outputs to the call's token
        address) and returns when it ends, raising what it ended with."""
        ends: asyncio.Queue[End] = asyncio.Queue()
        mine: dict[str, asyncio.Task] = {}
        try:
            for request in requests:
                request_id = request[2]
                if request_id in self.tasks:
                    ends.put_nowait((request_id, ("ValueError",
                                                  f"request id {request_id!r} is already running")))
                    continue
                task = asyncio.ensure_future(run(request))
                task.add_done_callback(functools.partial(self._ended, ends, request_id))
                self.tasks[request_id] = mine[request_id] = task
            yield len(requests)
            left = len(requests)
            while left:
                done = [await ends.get()]
                while not ends.empty():
                    done.append(ends.get_nowait())
                left -= len(done)
                yield done
        finally:
            for request_id, task in mine.items():  # left before its requests ended
                task.cancel()
                if self.tasks.get(request_id) is task:
                    del self.tasks[request_id]

    def abort(self, request_id: str) -> None:
        """(On the replica's event loop.) Cancel the request's task; unknown ids are ignored."""
        task = self.tasks.get(request_id)
        if task is not None:
            task.cancel()

    def _ended(self, ends: asyncio.Queue, request_id: str, task: asyncio.Task) -> None:
        if self.tasks.get(request_id) is task:
            del self.tasks[request_id]
        ends.put_nowait((request_id, _error(task)))


def _error(task: asyncio.Task) -> tuple[str, str] | None:
    if task.cancelled():
        return ("RuntimeError", "the request was aborted")
    e = task.exception()
    if e is None:
        return None
    return ("ValueError" if isinstance(e, ValueError) else "RuntimeError", str(e))

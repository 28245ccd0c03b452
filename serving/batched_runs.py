"""A serving replica's side of a call of many requests (`run_many`, and the prefill replica's
`prefill_many`): many requests in one Serve call (serving/batched_submit.py is the caller's side).

Every Serve call costs the serving replica Python work under the GIL (Serve's request wrapper,
Ray's deserialization of the call), which the engine's step thread waits for: when a wave of
128 requests arrived as 128 calls, the wave's first steps spent ~115-130 ms off the CPU
(docs/benchmarks.md, step logs of run 89). A call of many requests pays that once.

The call is a stream. It yields the number of requests accepted once each has been started,
then, as requests end, lists of `(request_id, error, value)`: error is None when the request
ended well, else `(kind, message)`, kind "ValueError" for input the engine refused (the API
answers 4xx) or "RuntimeError"; value is what the request's run returned (None for `run_many`,
whose outputs travel through the token path, as with `run`; the PrefillResult for
`prefill_many`). A request's abort comes as `abort(request_id)` (the token socket's abort
frames), and cancels that request's task as Serve's cancellation cancels a call of one. The
call's own cancellation (its caller went away) cancels all of its requests' tasks.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable

from engine.sampling_params import SamplingParams

# prompt ids, sampling params, request id (a prefill's also carries its first block)
Request = tuple[list[int], SamplingParams, str] | tuple[list[int], SamplingParams, str, int]
End = tuple[str, tuple[str, str] | None, object]  # request id, error (kind, message), value


class BatchedRuns:
    """The open requests of a replica's `run_many` calls, by request id."""

    def __init__(self) -> None:
        self.tasks: dict[str, asyncio.Task] = {}

    async def run_many(self, requests: list[Request], run: Callable[[Request], Awaitable[object]],
                       ) -> AsyncIterator[int | list[End]]:
        """`run(request)` runs one request (the replica's `run`, outputs to the call's token
        address; or a prefill) and returns its value when it ends, raising what it ended
        with."""
        ends: asyncio.Queue[End] = asyncio.Queue()
        mine: dict[str, asyncio.Task] = {}
        try:
            for request in requests:
                request_id = request[2]
                if request_id in self.tasks:
                    ends.put_nowait((request_id, ("ValueError",
                                                  f"request id {request_id!r} is already running"),
                                     None))
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
        error = _error(task)
        ends.put_nowait((request_id, error, None if error is not None else task.result()))


def _error(task: asyncio.Task) -> tuple[str, str] | None:
    if task.cancelled():
        return ("RuntimeError", "the request was aborted")
    e = task.exception()
    if e is None:
        return None
    return ("ValueError" if isinstance(e, ValueError) else "RuntimeError", str(e))

"""The ingress side's core, whichever way the per-step batches arrive (a token mailbox,
serving/token_mailbox.py, or a token socket, serving/token_socket.py): `Fanout` feeds the open
requests' queues from batches, and `TokenReader` runs the subclass's receiving task. Plain
asyncio."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import pickle

from engine.outputs import RequestOutput

log = logging.getLogger(__name__)


class Fanout:
    """Per-request queues fed from batches of outputs."""

    def __init__(self) -> None:
        self.queues: dict[str, asyncio.Queue] = {}

    def open(self, request_id: str) -> asyncio.Queue:
        if request_id in self.queues:
            raise ValueError(f"request id {request_id!r} is already running")
        self.queues[request_id] = queue = asyncio.Queue()
        return queue

    def close(self, request_id: str) -> None:
        self.queues.pop(request_id, None)

    def deliver(self, outputs: list[RequestOutput]) -> None:
        """Outputs of requests no longer open (finished, cancelled) are dropped."""
        for out in outputs:
            queue = self.queues.get(out.request_id)
            if queue is not None:
                queue.put_nowait(out)

    def deliver_batch(self, blob: bytes) -> None:
        """A step's batch as `StepSink.flush` pickled it (serving/step_sink.py); pickled by this
        cluster's own serving replicas."""
        self.deliver([RequestOutput.from_wire(t) for t in pickle.loads(blob)])

    def fail(self, error: BaseException) -> None:
        for queue in self.queues.values():
            queue.put_nowait(error)


class TokenReader:
    """An ingress replica's reader: requests open queues on its `fanout`, which the subclass's
    `_receive()` feeds. That task starts with the first `open`, on the running event loop, and
    again with the next `open` if it has ended, until `_closed` is set."""

    def __init__(self) -> None:
        self.fanout = Fanout()
        self._task: asyncio.Task | None = None
        self._closed = False

    def open(self, request_id: str) -> asyncio.Queue:
        self.start()
        return self.fanout.open(request_id)

    def start(self) -> None:
        """(On the event loop.) Start `_receive()` if it is not running; `open` does."""
        if not self._closed and (self._task is None or self._task.done()):
            if self._task is not None and not self._task.cancelled():
                log.error("%s stopped (%r); starting it again", type(self).__name__,
                          self._task.exception())
            # Not in the opening request's context: Ray cancels a request's calls with it, and
            # the task serves every open stream.
            self._task = asyncio.get_running_loop().create_task(
                self._receive(), context=contextvars.Context())

    def close(self, request_id: str) -> None:
        self.fanout.close(request_id)

    async def _receive(self) -> None:
        """Feed `fanout` until cancelled."""
        raise NotImplementedError

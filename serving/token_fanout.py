"""Per-request queues fed from batches of outputs: the ingress side's core, whichever way the
batches arrive (a token mailbox, serving/token_mailbox.py, or a token socket,
serving/token_socket.py). Plain asyncio."""

from __future__ import annotations

import asyncio

from engine.outputs import RequestOutput


class Fanout:
    """Per-request queues fed from batches of outputs (plain asyncio; the reader's core)."""

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

    def fail(self, error: BaseException) -> None:
        for queue in self.queues.values():
            queue.put_nowait(error)

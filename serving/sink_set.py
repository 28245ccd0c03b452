"""A serving replica's step sinks: one per ingress that sent it requests, of the kind the
ingress's address names (a token mailbox actor, or a token socket)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from engine.metrics import Metrics
from serving.step_sink import StepSink
from serving.token_mailbox import MailboxSink
from serving.token_path import TokenAddress
from serving.token_socket import SocketSink, TokenSocket


class SinkSet:
    """`get` returns the live sink for an address, making one when there is none or the last
    one was lost; it forgets every lost sink as it makes one (a peer that died never asks
    again; its replacement does, with an address of its own). A socket sink connects in a
    worker thread (up to its connect timeout when the ingress's host does not answer), so the
    replica's event loop and its other requests go on meanwhile; requests that arrive during
    the connect share it. A socket sink hands the aborts its ingress sends to `on_abort`, on
    the loop that asked for the sink."""

    def __init__(self, metrics: Metrics, on_lost: Callable[[list[str]], None],
                 on_abort: Callable[[str], None] | None = None) -> None:
        self.metrics, self.on_lost, self.on_abort = metrics, on_lost, on_abort
        self.sinks: dict[str, StepSink] = {}
        self._connecting: dict[str, asyncio.Future] = {}

    async def get(self, mailbox: TokenAddress) -> StepSink:
        sink = self.sinks.get(mailbox.id)
        if sink is not None and not sink.lost:
            return sink
        # A new sink: the lost ones go now, off the path of the requests to live ones.
        for lost in [mid for mid, old in self.sinks.items() if old.lost]:
            del self.sinks[lost]
        if not isinstance(mailbox, TokenSocket):
            sink = self.sinks[mailbox.id] = MailboxSink(mailbox, self.metrics, self.on_lost)
            return sink
        pending = self._connecting.get(mailbox.id)
        if pending is None:
            pending = self._connecting[mailbox.id] = asyncio.ensure_future(
                asyncio.to_thread(SocketSink, mailbox, self.metrics, self.on_lost,
                                  on_abort=self.on_abort, loop=asyncio.get_running_loop()))
            pending.add_done_callback(lambda done: self._connected(mailbox.id, done))
        # Shielded: one waiter's cancellation must not stop the connect the others wait for.
        return await asyncio.shield(pending)

    def _connected(self, mailbox_id: str, done: asyncio.Future) -> None:
        del self._connecting[mailbox_id]
        if not done.cancelled() and done.exception() is None:
            self.sinks[mailbox_id] = done.result()

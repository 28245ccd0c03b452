"""SubmitBatcher: a caller sends requests to a deployment many to a Serve call
(serving/batched_runs.py is the replica's side). Two callers use it: the ingress, to the serving
deployment's `run_many` (`submit_batch` > 1), and a decode replica, to the prefill deployment's
`prefill_many` (`decode.prefill_batch` > 1).

A Serve call per request costs both processes Python work under the GIL (the caller's router,
the callee's request wrapper and deserialization), which their engine step threads wait for
while a wave of requests arrives. The batcher sends the first request of a burst at once, in a
call of its own; requests that arrive while calls are being accepted wait, and go together, up
to `max_batch` a call, as soon as the replica has accepted those (Nagle's algorithm, for
calls): a lone request waits for nothing, a burst costs a few calls, and the more the replica
lags, the larger the batches. A request waits at most `max_hold_s` so: a call that Serve holds
back (its replicas all at `max_ongoing_requests`) or that waits for a replica's first
connection does not hold up the requests behind it for long.

`run(*request)` stands in for `handle.<one>.remote(*request, address)` (api/mailbox_call.py;
decode/deployment.py): it returns an awaitable that ends when the request has ended on the
replica, with the value its run returned there (None for `run_many`, a PrefillResult for
`prefill_many`), or raising what it ended with (a ValueError for input the engine refused; the
call's error, e.g. a replica that died, for every request of the call that had not ended), and
whose `cancel()` aborts the request. A request not yet sent is dropped; one sent is aborted
through the caller's token socket (`SocketReader.abort`; the replica connects to it when the
call starts), once its call has been accepted, so that the abort cannot arrive before the
request. The request id is the request's third item.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.hop_log import hop
from serving.token_socket import SocketReader, TokenSocket


@dataclass(eq=False)
class _Call:
    """One call of many requests: their futures, until each has ended."""

    futures: dict[str, asyncio.Future]
    accepted: bool = False
    aborts: list[str] = field(default_factory=list)  # cancelled before the call was accepted


class BatchedResponse:
    """One request's part of a batched call, as a DeploymentResponse: awaitable, cancellable."""

    def __init__(self, batcher: SubmitBatcher, request_id: str, future: asyncio.Future) -> None:
        self.batcher, self.request_id, self.future = batcher, request_id, future

    def __await__(self):
        return self.future.__await__()

    def cancel(self) -> None:
        self.batcher.cancel(self.request_id)


MAX_HOLD_S = 0.05


class SubmitBatcher:
    """Sends to `handle`'s streaming method `method`, called as `method(requests, address)`
    with the reader's address; each request passes the hop `sent_hop` (engine/hop_log.py) as
    its call goes."""

    def __init__(self, handle: Any, reader: SocketReader, max_batch: int,
                 max_hold_s: float = MAX_HOLD_S, method: str = "run_many",
                 sent_hop: str = "ingress.sent",
                 unclaimed: Callable[[object], None] | None = None) -> None:
        self._method = getattr(handle.options(stream=True), method)
        self.sent_hop = sent_hop
        # Gets the value of a request that ended well after its caller cancelled it (its abort
        # came too late), where a value holds something to give back (a prefill's KV).
        self.unclaimed = unclaimed
        self.reader, self.max_batch, self.max_hold_s = reader, max_batch, max_hold_s
        self._hold: asyncio.TimerHandle | None = None  # sends the held requests at the latest
        self._queued: dict[str, tuple[tuple, asyncio.Future]] = {}  # not sent yet
        self._calls: dict[str, _Call] = {}  # sent, not ended: request id -> its call
        self._opening = 0  # calls sent and not yet accepted
        self.num_calls = 0

    def run(self, *request: Any) -> BatchedResponse:
        """`request`: one request's arguments, its id third. A token address last (the ingress
        passes its reader's, as to a `run` call) is left out: the batch call carries it once."""
        if isinstance(request[-1], TokenSocket):
            request = request[:-1]
        request_id = request[2]
        if request_id in self._queued or request_id in self._calls:
            raise ValueError(f"request id {request_id!r} is already running")
        future = asyncio.get_running_loop().create_future()
        self._queued[request_id] = (request, future)
        if not self._opening:
            self._send()
        elif self._hold is None:
            self._hold = asyncio.get_running_loop().call_later(self.max_hold_s, self._send)
        return BatchedResponse(self, request_id, future)

    def cancel(self, request_id: str) -> None:
        queued = self._queued.pop(request_id, None)
        if queued is not None:
            queued[1].cancel()
            return
        call = self._calls.pop(request_id, None)
        if call is None:
            return  # ended already
        call.futures.pop(request_id).cancel()
        if call.accepted:
            self.reader.abort([request_id])
        else:
            call.aborts.append(request_id)

    def _send(self) -> None:
        if self._hold is not None:
            self._hold.cancel()
            self._hold = None
        items = list(self._queued.values())
        self._queued.clear()
        # The called replicas connect to the reader for their aborts: it must accept them even
        # where no stream opens on it (a decode replica's, for its prefill calls).
        self.reader.start()
        for start in range(0, len(items), self.max_batch):
            batch = items[start:start + self.max_batch]
            call = _Call({args[2]: future for args, future in batch})
            for request_id in call.futures:
                hop(request_id, self.sent_hop)
            self._calls.update(dict.fromkeys(call.futures, call))
            self._opening += 1
            self.num_calls += 1
            # In a context of its own: Serve cancels the calls made in a request's context
            # when that request ends, and this call serves many.
            asyncio.get_running_loop().create_task(
                self._call(call, [args for args, _ in batch]), context=contextvars.Context())

    def _accepted(self, call: _Call) -> None:
        call.accepted = True
        self._opening -= 1
        if call.aborts:
            self.reader.abort(call.aborts)
            call.aborts = []
        if not self._opening and self._queued:
            self._send()

    async def _call(self, call: _Call, requests: list[tuple]) -> None:
        error: BaseException | None = None
        try:
            stream = self._method.remote(requests, self.reader.mailbox)
            async for item in stream:
                if not call.accepted:  # the first item: every request was started
                    self._accepted(call)
                    continue
                for request_id, failure, value in item:
                    self._end(call, request_id, _error(failure), value)
        except Exception as e:  # the call failed: its open requests fail with it
            error = e
        finally:
            if not call.accepted:
                self._accepted(call)
            for request_id in list(call.futures):
                self._end(call, request_id, error or RuntimeError(
                    f"the serving replica's call ended before request {request_id}"))

    def _end(self, call: _Call, request_id: str, error: BaseException | None,
             value: object = None) -> None:
        future = call.futures.pop(request_id, None)
        if self._calls.get(request_id) is call:
            del self._calls[request_id]
        if future is None or future.done():
            if error is None and value is not None and self.unclaimed is not None:
                self.unclaimed(value)
            return
        if error is None:
            future.set_result(value)
        else:
            future.set_exception(error)


def _error(failure: tuple[str, str] | None) -> BaseException | None:
    if failure is None:
        return None
    kind, message = failure
    return ValueError(message) if kind == "ValueError" else RuntimeError(message)

"""Admission control: overload gets a fast 429 with Retry-After instead of a pile-up.

Two gates, both passed before anything reaches a serving replica:

- `max_concurrent_requests`: generation requests (HTTP requests, as TGI counts them) past the
  limit are refused at once, before their body is even read (`AdmissionGate`, a plain ASGI
  middleware): a burst is answered at the cost of a header check, not of parsing and
  tokenizing. The slot is held until the response's last bytes, stream included. Behind
  Serve the limit is cluster-wide: every ingress replica takes its slots from one ledger
  (`shared`, serving/admission_ledger.py: one message per request, none per token); without
  one (tests, no Ray) the count is this process's.
- `max_batch_prefill_tokens`, per ingress replica: prompt tokens admitted but still waiting
  for their first token. Past it, requests wait in a FIFO queue for at most `queue_timeout_s`,
  then get a 429. A prompt larger than the whole budget runs alone, so that nothing waits
  forever. `AdmittedClient` wraps the generation client with this gate: the tokens count until
  the first output arrives.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Protocol

from starlette.types import ASGIApp, Receive, Scope, Send

from api.context import GenerateClient
from api.errors import APIError, error_response, route_path
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from serving.limits import Limits


class Overloaded(APIError):
    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message, code="overloaded", status=429,
                         headers={"Retry-After": str(retry_after_s)})


class SharedGate(Protocol):
    """Slots shared with other ingress replicas (serving.admission_ledger.SharedSlots).
    `ledger_up`: the last call reached the ledger; `num_fallbacks`: decisions taken locally."""

    ledger_up: bool
    num_fallbacks: int

    async def acquire(self) -> bool: ...

    def release(self) -> None: ...

    async def run_renewals(self) -> None:
        """Runs for the app's lifetime: keeps this replica's count alive in the ledger."""


class Admission:
    def __init__(self, limits: Limits, shared: SharedGate | None = None) -> None:
        self.limits, self.shared = limits, shared
        self.active = 0  # admitted generation requests
        self.prefilling = 0  # prompt tokens admitted, first token not yet out
        self._queue: deque[tuple[int, asyncio.Future]] = deque()
        self.num_rejected = 0

    @property
    def num_waiting(self) -> int:
        return len(self._queue)

    async def enter(self) -> None:
        """Take a concurrency slot or raise Overloaded (never queues; with a shared gate, waits
        for the ledger's answer only)."""
        limit = self.limits.max_concurrent_requests
        if self.active >= limit:  # full here already: no need to ask the ledger
            self._refuse(limit)
        self.active += 1
        if self.shared is None:
            return
        try:
            granted = await self.shared.acquire()
        except BaseException:  # cancelled (client gone) while asking
            self.active -= 1
            raise
        if not granted:
            self.active -= 1
            self._refuse(limit)

    def _refuse(self, limit: int) -> None:
        self.num_rejected += 1
        raise Overloaded(f"the server is overloaded: {limit} requests are already running; "
                         "retry later", self.limits.retry_after_s)

    def leave(self) -> None:
        self.active -= 1
        if self.shared is not None:
            self.shared.release()

    async def start_prefill(self, tokens: int) -> None:
        """Admit `tokens` prompt tokens to prefill, waiting (bounded) for room."""
        budget = self.limits.max_batch_prefill_tokens
        if budget is None or (not self._queue and self._fits(tokens, budget)):
            self.prefilling += tokens
            return
        fut = asyncio.get_running_loop().create_future()
        entry = (tokens, fut)
        self._queue.append(entry)
        start = time.monotonic()
        try:
            await asyncio.wait_for(asyncio.shield(fut), self.limits.queue_timeout_s)
        except TimeoutError:
            if not fut.done():
                self._queue.remove(entry)
                self.num_rejected += 1
                raise Overloaded(f"the server is overloaded: waited "
                                 f"{time.monotonic() - start:.1f} s for prefill capacity "
                                 f"({budget} prompt tokens); retry later",
                                 self.limits.retry_after_s) from None
        except BaseException:  # cancelled (client gone): give back what was granted
            if entry in self._queue:
                self._queue.remove(entry)
            elif fut.done():
                self.end_prefill(tokens)
            raise

    def end_prefill(self, tokens: int) -> None:
        self.prefilling -= tokens
        budget = self.limits.max_batch_prefill_tokens
        while self._queue and budget is not None and self._fits(self._queue[0][0], budget):
            tokens_next, fut = self._queue.popleft()
            self.prefilling += tokens_next
            fut.set_result(None)

    def _fits(self, tokens: int, budget: int) -> bool:
        return self.prefilling == 0 or self.prefilling + tokens <= budget


class AdmittedClient:
    """A GenerateClient behind the prefill-token gate (raises Overloaded before any output)."""

    def __init__(self, client: GenerateClient, admission: Admission) -> None:
        self.client, self.admission = client, admission

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        gate = self.admission
        await gate.start_prefill(len(prompt_ids))
        prefilling = True
        try:
            # Closed here, not left to garbage collection: closing aborts the request upstream.
            async with aclosing(self.client.generate(prompt_ids, params, request_id)) as outs:
                async for out in outs:
                    if prefilling:
                        prefilling = False
                        gate.end_prefill(len(prompt_ids))
                    yield out
        finally:
            if prefilling:
                gate.end_prefill(len(prompt_ids))


GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/generate",
                              "/generate_stream", "/"})


class AdmissionGate:
    """ASGI middleware: a concurrency slot per generation request, or a 429 at once."""

    def __init__(self, app: ASGIApp, admission: Admission) -> None:
        self.app, self.admission = app, admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = route_path(scope)
        if (scope["type"] != "http" or scope["method"] != "POST"
                or path not in GENERATION_PATHS):
            await self.app(scope, receive, send)
            return
        try:
            await self.admission.enter()
        except Overloaded as e:
            await error_response(e, path)(scope, receive, send)
            return
        left = False

        async def send_last_after_leaving(message: dict) -> None:
            # The slot goes back just before the response's last bytes, not once the app has
            # also closed its streams: a client that sends its next request as soon as this
            # one ends must find the slot free, on whichever ingress replica the next one
            # lands (the release to a shared ledger is a message that is not waited for).
            nonlocal left
            if (message["type"] == "http.response.body" and not message.get("more_body")
                    and not left):
                left = True
                self.admission.leave()
            await send(message)

        try:
            await self.app(scope, receive, send_last_after_leaving)
        finally:
            if not left:  # no complete response (an error, the client gone)
                self.admission.leave()

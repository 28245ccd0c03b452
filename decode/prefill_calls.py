"""PrefillCalls: a decode replica's calls to the prefill deployment (step 2 of
decode/worker.py), and the KV that each answer leaves on its prefill replica until it is
received. One owner: an answer is either claimed (`result`) and received by the worker, or
released here (`KVTransport.release`); else the prefill replica would keep it (with `cuda_ipc`,
GPU memory) for good.

A call may go out before the request's reservation (`early`): the reservation waits for the
engine's step thread (~10-30 ms in a burst), and the call need not, as long as it asks for the
blocks the reservation will start at, which the prefix cache says now.

Contract (all on the replica's event loop):
- `start(prefill, prompt_ids, params, request_id, first_block)` makes a call.
- `early(prefill, prompt_ids, params, request_id, cached)` makes one for the blocks this
  engine caches now (`cached` tokens, as `AsyncEngine.cached_prefix_tokens` says); or returns
  None where it should wait for the reservation: the pool looks too full for the prompt,
  counting the pages of the early calls whose reservations are still to come (a reservation
  that waits drops its call, which a prefill replica may have started on for nothing).
  `reserved(call)` once its reservation was made or has failed.
- `await result(call)`: the call's PrefillResult, whose KV the caller now owns. A caller
  cancelled meanwhile drops the call.
- `drop(call)` when the call will not be used (the reservation starts at another block or
  waits for pages, the request ended): the call is cancelled, and if it ends with an answer
  all the same (it had come), that answer's KV is released. Does nothing the second time. A
  `Prefiller` cancelled after its answer came returns it (decode/deployment.py).
- `abandon(call)`: `drop` and `reserved` at once, for an early call whose request will make no
  reservation (it prefills here, or it ended while it waited).
- `release(answer)`: an answer that came for no call (its caller had left, and its abort came
  too late on the prefill replica) has its KV released.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from engine.async_engine import AsyncEngine
from engine.hop_log import hop
from engine.metrics import Metrics
from engine.sampling_params import SamplingParams
from kvtransfer import KVTransport
from serving.pd_protocol import Prefiller, PrefillResult

log = logging.getLogger(__name__)


@dataclass(eq=False)
class PrefillCall:
    """A prefill call for the blocks from `first_block` on; made early, its reservation needs
    `pages` fresh pages (0 otherwise)."""

    first_block: int
    task: asyncio.Task
    pages: int = 0
    dropped: bool = False


class PrefillCalls:
    """Counts each dropped call in `pdserve_prefill_calls_dropped_total`: early calls not
    used, and calls whose request ended first (prefill work that may have been done for
    nothing)."""

    def __init__(self, engine: AsyncEngine, transport: KVTransport, metrics: Metrics) -> None:
        self.engine, self.transport, self.metrics = engine, transport, metrics
        self.pending_pages = 0  # fresh pages that early calls' reservations, not yet made, need
        self.releases: set[asyncio.Task] = set()  # dropped calls still ending or being received

    def start(self, prefill: Prefiller, prompt_ids: list[int], params: SamplingParams,
              request_id: str, first_block: int, pages: int = 0) -> PrefillCall:
        hop(request_id, "decode.prefill_call")
        return PrefillCall(first_block, asyncio.ensure_future(
            prefill.prefill(prompt_ids, params, request_id, first_block)), pages)

    def early(self, prefill: Prefiller, prompt_ids: list[int], params: SamplingParams,
              request_id: str, cached: int) -> PrefillCall | None:
        _, page_size = self.engine.kv_layout
        first_block = cached // page_size
        pages = -(-len(prompt_ids) // page_size) - first_block
        if self.engine.free_pages_hint() - self.pending_pages < pages:
            return None
        self.pending_pages += pages
        return self.start(prefill, prompt_ids, params, request_id, first_block, pages)

    def reserved(self, call: PrefillCall | None) -> None:
        if call is not None:
            self.pending_pages -= call.pages

    async def result(self, call: PrefillCall) -> PrefillResult:
        try:
            return await asyncio.shield(call.task)
        except asyncio.CancelledError:
            self.drop(call)
            raise

    def drop(self, call: PrefillCall | None) -> None:
        if call is None or call.dropped:
            return
        call.dropped = True
        self.metrics.inc("pdserve_prefill_calls_dropped_total")
        call.task.cancel()
        self._track(self._release(call.task))

    def abandon(self, call: PrefillCall | None) -> None:
        """An early call that will have no reservation: dropped, its pending pages given back."""
        self.drop(call)
        self.reserved(call)

    def release(self, answer: PrefillResult) -> None:
        """An answer no call claims (it came after its caller left): its KV is released."""
        self._track(self._throw_away(answer))

    def _track(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self.releases.add(task)
        task.add_done_callback(self.releases.discard)

    async def _release(self, call: asyncio.Task) -> None:
        await asyncio.gather(call, return_exceptions=True)
        if not call.cancelled() and call.exception() is None:
            await self._throw_away(call.result())

    async def _throw_away(self, answer: PrefillResult) -> None:
        try:
            await self.transport.release(answer.kv, self.engine.device)
        except Exception as e:  # noqa: BLE001 - nothing is waiting for it
            log.warning("could not release an unused prefill's KV: %r", e)

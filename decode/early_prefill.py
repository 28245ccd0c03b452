"""EarlyPrefills: a decode replica's prefill calls made before their reservations (step 2 of
decode/worker.py). A reservation waits for the engine's step thread (~10-30 ms in a burst);
the call need not, as long as it asks for the blocks the reservation will start at, which the
prefix cache says now.

Contract (all on the replica's event loop):
- `start(prefill, prompt_ids, params, request_id)` makes the call for the blocks this engine
  caches now, and returns it; or returns None where it should wait for the reservation: the
  pool looks too full for the prompt, counting the pages of the early calls whose reservations
  are still to come (a reservation that waits drops its call, which a prefill replica may have
  started on for nothing).
- `reserved(early)` once its reservation was made or has failed: its pages stop counting.
- `drop(early)` when the call will not be used (the reservation starts at another block, or
  waits for pages, or the request ended): the call is aborted, and if it had ended already, its
  KV is received and thrown away, since the prefill replica keeps it until it is received. Does
  nothing the second time.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from engine.async_engine import AsyncEngine
from engine.hop_log import hop
from engine.sampling_params import SamplingParams
from kvtransfer import KVTransport
from serving.pd_protocol import Prefiller

log = logging.getLogger(__name__)


@dataclass(eq=False)
class EarlyPrefill:
    """A prefill call for the blocks from `first_block` on; the reservation needs `pages` fresh
    pages."""

    first_block: int
    pages: int
    task: asyncio.Task
    dropped: bool = False


class EarlyPrefills:
    def __init__(self, engine: AsyncEngine, transport: KVTransport) -> None:
        self.engine, self.transport = engine, transport
        self.pending_pages = 0  # fresh pages that early calls' reservations, not yet made, need
        self.releases: set[asyncio.Task] = set()  # dropped calls still ending or being received

    def start(self, prefill: Prefiller, prompt_ids: list[int], params: SamplingParams,
              request_id: str) -> EarlyPrefill | None:
        _, page_size = self.engine.kv_layout
        first_block = self.engine.cached_prefix_tokens(prompt_ids) // page_size
        pages = -(-len(prompt_ids) // page_size) - first_block
        if self.engine.free_pages_hint() - self.pending_pages < pages:
            return None
        self.pending_pages += pages
        hop(request_id, "decode.prefill_call")
        return EarlyPrefill(first_block, pages, asyncio.ensure_future(
            prefill.prefill(prompt_ids, params, request_id, first_block)))

    def reserved(self, early: EarlyPrefill | None) -> None:
        if early is not None:
            self.pending_pages -= early.pages

    def drop(self, early: EarlyPrefill | None) -> None:
        if early is None or early.dropped:
            return
        early.dropped = True
        early.task.cancel()
        task = asyncio.ensure_future(self._release(early.task))
        self.releases.add(task)
        task.add_done_callback(self.releases.discard)

    async def _release(self, call: asyncio.Task) -> None:
        await asyncio.gather(call, return_exceptions=True)
        if call.cancelled() or call.exception() is not None:
            return
        try:
            await self.transport.receive(call.result().kv, self.engine.device)
        except Exception as e:  # noqa: BLE001 - nothing is waiting for it
            log.warning("could not release an unused prefill's KV: %r", e)

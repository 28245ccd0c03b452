"""DecodeWorker: orchestrates one request across the phases and streams its tokens.

1. reserve pages for the prompt, reusing blocks this replica already caches;
2. ask a prefill replica for the first token and only the blocks this side lacks;
3. receive the pages through the transport, check them, place them into the reserved pages;
4. join the running batch between two steps and stream every token until the request ends.
No Ray here: `prefill` is any `Prefiller` (serving/pd_protocol.py).

Steps 2-3 are retried, at most `prefill_retries` times, when `retriable(error)` says the
prefill replica (or the KV it owned) was lost: the next call goes to another prefill replica.
The receive is bounded by `timeout_s`; the prefill client bounds its own call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from engine.async_engine import AsyncEngine
from engine.metrics import Metrics, track_stream
from engine.request import Request
from engine.sampling_params import SamplingParams
from kvtransfer import KVPayload, KVTransport
from serving.pd_protocol import Prefiller, PrefillResult

log = logging.getLogger(__name__)


class DecodeWorker:
    def __init__(self, engine: AsyncEngine, prefill: Prefiller, transport: KVTransport,
                 fingerprint: str, metrics: Metrics | None = None, reserve_timeout_s: float = 60.0,
                 timeout_s: float = 600.0, prefill_retries: int = 2,
                 retriable: Callable[[BaseException], bool] = lambda e: False) -> None:
        self.engine = engine
        self.prefill = prefill
        self.transport = transport
        self.fingerprint = fingerprint
        self.metrics = metrics or Metrics("decode", "local")
        self.reserve_timeout_s = reserve_timeout_s
        self.timeout_s, self.prefill_retries, self.retriable = timeout_s, prefill_retries, retriable

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str):
        start = time.perf_counter()
        self.metrics.inc("pdserve_requests_total")
        stream = self._generate(list(prompt_ids), params, request_id)
        async for out in track_stream(stream, self.metrics, start):
            yield out

    async def _generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str):
        eng = self.engine.engine
        eng.validate(prompt_ids, params)
        req = Request(request_id, prompt_ids, params)
        first_block = await self._reserve(req)
        try:
            result, payload = await self._fetch(prompt_ids, params, request_id, first_block)
            payload.check(dtype=eng.pool.dtype, page_size=eng.cfg.page_size,
                          first_block=first_block, block_hashes=req.block_hashes,
                          fingerprint=self.fingerprint,
                          num_pages=len(req.block_table) - first_block)
        except BaseException:
            self.engine.submit(lambda: eng.unreserve(req))
            raise
        self.metrics.inc("pdserve_kv_transfer_bytes_total", payload.nbytes)
        self.metrics.inc("pdserve_kv_transfer_blocks_skipped_total", first_block)
        self.metrics.inc("pdserve_prompt_tokens_total", len(prompt_ids))
        req.num_cached_tokens = max(req.num_cached_tokens, result.num_cached_tokens)
        stream = self.engine.admit_prefilled(req, first_block, payload.data, result.first_token,
                                             result.logprob)
        del payload  # the stream holds the pages only until they are copied into the pool
        async for out in stream:
            yield out

    async def _fetch(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
                     first_block: int) -> tuple[PrefillResult, KVPayload]:
        """The first token and the missing KV blocks, from another prefill replica if one is
        lost on the way."""
        for attempt in range(self.prefill_retries + 1):
            try:
                result = await self.prefill.prefill(prompt_ids, params, request_id, first_block)
                # The receive places the pages on this replica's device, off the engine loop;
                # between two steps only their scatter into the reserved pages runs.
                start = time.perf_counter()
                payload = await asyncio.wait_for(
                    self.transport.receive(result.kv, self.engine.engine.device), self.timeout_s)
                self.metrics.inc("pdserve_kv_transfer_seconds_total", time.perf_counter() - start)
                return result, payload
            except Exception as e:
                if attempt == self.prefill_retries or not self.retriable(e):
                    raise
                self.metrics.inc("pdserve_prefill_retries_total")
                log.warning("prefill of %s lost (%s); retrying on another replica",
                            request_id, type(e).__name__)
                await asyncio.sleep(0.1 * 2**attempt)  # let Serve notice the dead replica
        raise AssertionError("unreachable")

    async def _reserve(self, req: Request) -> int:
        """Pages for the prompt; waits (bounded) while the pool is full of running requests."""
        deadline = time.monotonic() + self.reserve_timeout_s
        eng = self.engine.engine
        while True:
            try:
                first_block = await self.engine.call(lambda: eng.reserve(req))
            except asyncio.CancelledError:
                # The reservation may still run: queue its undoing right behind it.
                self.engine.submit(lambda: eng.unreserve(req))
                raise
            if first_block is not None:
                return first_block
            if time.monotonic() > deadline:
                raise TimeoutError(f"no KV pages free for {req.request_id} after "
                                   f"{self.reserve_timeout_s:.0f} s")
            await asyncio.sleep(0.01)

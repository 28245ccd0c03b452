"""DecodeWorker: orchestrates one request across the phases and streams its tokens.

0. if another request here is fetching blocks of this prompt that the prefix cache lacks, wait
   until it has them in (decode/imports_in_flight.py); then claim the blocks it lacks itself;
1. reserve pages for the prompt, reusing blocks this replica already caches;
2. ask a prefill replica for the first token and only the blocks this side lacks. The call goes
   out beside 1, not after it (the reservation waits for the engine's step thread), for the
   blocks cached here when the request came, where the pool looks able to take the prompt. If
   the reservation starts at another block (pages evicted or cached meanwhile) or has to wait
   for free pages, that call is dropped (aborted; its KV, if it came, released) and made again
   once the reservation is there;
3. receive the pages through the transport, check them, place them into the reserved pages (the
   transport writes them there itself where it can: `KVTransport.receive_into`);
4. join the running batch between two steps and stream every token until the request ends.
No Ray here: `prefill` is any `Prefiller` (serving/pd_protocol.py).

A prompt of which at most `local_prefill_max_tokens` tokens are not in this replica's prefix
cache (a short prompt, or a new turn of a conversation routed here for its prefix) skips 1-3:
this engine takes its pages and prefills it in its own steps, as a colocated engine does. That
makes the running batch's steps longer while it runs, against a round trip to a prefill replica
and a KV transfer; 0 (the default) sends every prompt there. Such a request's TTFT also goes to
`pdserve_local_prefill_ttft_seconds`, so that the SLO autoscaler can leave it out of the TTFT it
charges to the prefill replicas (cluster/slo_autoscaler.py).

Steps 2-3 are retried, at most `prefill_retries` times, when `retriable(error)` says the
prefill replica (or the KV it owned) was lost: the next call goes to another prefill replica.
The receive is bounded by `timeout_s`; the prefill client bounds its own call.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from contextlib import aclosing

from decode.imports_in_flight import Claim, ImportsInFlight
from decode.prefill_calls import PrefillCall, PrefillCalls
from engine.async_engine import AsyncEngine
from engine.block_hash import block_hashes
from engine.hop_log import hop
from engine.metrics import LOCAL_PREFILL_TTFT, FirstOutputTimer, Metrics, track_stream
from engine.output_streams import OutputSink
from engine.sampling_params import SamplingParams
from engine.scheduler import Reservation
from kvtransfer import KVPayload, KVTransport
from serving.pd_protocol import Prefiller, PrefillResult

log = logging.getLogger(__name__)


class DecodeWorker:
    def __init__(self, engine: AsyncEngine, prefill: Prefiller, transport: KVTransport,
                 fingerprint: str, metrics: Metrics | None = None, reserve_timeout_s: float = 60.0,
                 timeout_s: float = 600.0, prefill_retries: int = 2,
                 retriable: Callable[[BaseException], bool] = lambda e: False,
                 layerwise: bool | None = None, local_prefill_max_tokens: int = 0) -> None:
        self.engine = engine
        self.prefill = prefill
        self.transport = transport
        self.fingerprint = fingerprint
        self.metrics = metrics or Metrics("decode", "local")
        self.metrics.add_counter_source(transport.counters)
        self.reserve_timeout_s = reserve_timeout_s
        self.timeout_s, self.prefill_retries, self.retriable = timeout_s, prefill_retries, retriable
        # Receive the KV while the prefill computes it, when the transport can (default).
        self.layerwise = transport.supports_layerwise if layerwise is None else layerwise
        self.local_prefill_max_tokens = local_prefill_max_tokens
        self.calls = PrefillCalls(engine, transport, self.metrics)
        # Requests wait for the prompt blocks that others here import, where the prefix cache
        # would then hold them.
        self.share = engine.prefix_caching
        self.imports = ImportsInFlight()

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
                       sink: OutputSink | None = None):
        """The request's outputs; with `sink` they go there (it records their timing) and this
        stream yields only the last one."""
        start = time.perf_counter()
        hop(request_id, "decode.recv")
        self.metrics.inc("pdserve_requests_total")
        stream = self._generate(list(prompt_ids), params, request_id, sink, start)
        if sink is None:
            stream = track_stream(stream, self.metrics, start)
        # Each stream inside is closed explicitly, down to the engine's: a caller that closes
        # this one part-way (rather than cancelling the task that reads it) aborts the request
        # at once, not when the garbage collector finalizes the inner generators.
        async with aclosing(stream) as outputs:
            async for out in outputs:
                yield out

    async def _generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
                        sink: OutputSink | None, start: float):
        self.engine.validate(prompt_ids, params)
        # The prompt's block hashes, computed once: for the prefix cache's hint, the claims of
        # others, its own claim and every try of its reservation.
        _, page_size = self.engine.kv_layout
        hashes = block_hashes(prompt_ids, page_size) if self.share else None
        # One read of the prefix cache (a hint) for both choices below, once no other request
        # here imports blocks of this prompt that it lacks (the prefill call for its own
        # blocks may go out meanwhile: `early`).
        cached, early = await self._wait_for_shared_imports(prompt_ids, params, request_id,
                                                            hashes)
        if self._prefill_here(prompt_ids, cached):
            self.calls.abandon(early)
            self.metrics.inc("pdserve_local_prefills_total")
            self.metrics.inc("pdserve_prompt_tokens_total", len(prompt_ids))
            timer = FirstOutputTimer(self.metrics, LOCAL_PREFILL_TTFT, start, sink)
            async with aclosing(self.engine.generate(
                    prompt_ids, params, request_id, sink=None if sink is None else timer),
                    ) as outputs:
                async for out in outputs:
                    timer.seen()
                    yield out
            return
        # From here until its admission (or its end) others here wait for the blocks it
        # fetches (decode/imports_in_flight.py): claimed before anything is awaited, so that
        # requests that came together (one call of many) find the claim.
        claim = None if hashes is None else self.imports.add(hashes[cached // page_size:])
        try:
            async with aclosing(self._remote(prompt_ids, params, request_id, sink, cached,
                                             claim, early, hashes)) as outputs:
                async for out in outputs:
                    yield out
        finally:
            if claim is not None:
                self.imports.done(claim)

    async def _remote(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
                      sink: OutputSink | None, cached: int, claim: Claim | None,
                      early: PrefillCall | None = None, hashes: list[int] | None = None):
        """Steps 1-4: a prompt prefilled by a prefill replica; `early`, a call made while it
        waited for a claim; `hashes`, the prompt's block hashes if they are known."""
        # Step 2's call goes out before the reservation is made (decode/prefill_calls.py).
        if early is None and not self.layerwise:
            early = self.calls.early(self.prefill, prompt_ids, params, request_id, cached)
        try:
            rsv = await self._reserve(request_id, prompt_ids, params, hashes,
                                      on_full=lambda: self.calls.drop(early))
        except BaseException:
            self.calls.drop(early)
            raise
        finally:
            self.calls.reserved(early)
        hop(request_id, "decode.reserved")
        try:
            try:
                result, payload = await self._fetch(prompt_ids, params, request_id, rsv, early)
                hop(request_id, "decode.kv_in")
            finally:  # an abort meanwhile (client gone) frees the pages from here on
                self.engine.end_import(request_id)
            dtype, page_size = self.engine.kv_layout
            payload.check(dtype=dtype, page_size=page_size, first_block=rsv.first_block,
                          block_hashes=rsv.block_hashes, fingerprint=self.fingerprint,
                          num_pages=rsv.num_pages)
        except BaseException:
            self.engine.abort(request_id)  # frees the reservation
            raise
        self.metrics.inc("pdserve_kv_transfer_bytes_total", payload.nbytes)
        self.metrics.inc("pdserve_kv_transfer_blocks_skipped_total", rsv.first_block)
        self.metrics.inc("pdserve_prompt_tokens_total", len(prompt_ids))
        # A header (meta data): the transport already wrote the pages into the reservation.
        kv_data = None if payload.data.is_meta else payload.data
        # Once admitted, the prompt's pages are in the prefix cache: the claim's waiters go on.
        admitted = None if claim is None else functools.partial(self.imports.done, claim)
        stream = self.engine.admit_prefilled(request_id, rsv.first_block, kv_data,
                                             result.first_token, result.logprob,
                                             result.num_cached_tokens, sink,
                                             result.prompt_logprobs, admitted)
        del payload, kv_data  # the stream holds the pages only until they are in the pool
        async with aclosing(stream) as outputs:
            async for out in outputs:
                yield out

    async def _wait_for_shared_imports(self, prompt_ids: list[int], params: SamplingParams,
                                       request_id: str, hashes: list[int] | None,
                                       ) -> tuple[int, PrefillCall | None]:
        """Waits while another request here imports blocks of this prompt past those in the
        prefix cache (decode/imports_in_flight.py), at most `timeout_s` in all (then it
        fetches them itself). Meanwhile the prefill call for the blocks past the claimed ones
        goes out, unless this replica would prefill those itself: it need not queue at the
        prefill replica behind the claimant's admission. Returns the prefix cache's hint of
        cached prompt tokens, and that call (None if none was made). `hashes`: the prompt's
        block hashes; None without a prefix cache, where nothing waits."""
        cached = self.engine.cached_prefix_tokens(prompt_ids, hashes)
        if hashes is None:
            return cached, None
        _, page_size = self.engine.kv_layout
        deadline, early, waited = time.monotonic() + self.timeout_s, None, False
        try:
            while (found := self.imports.blocking(hashes, cached // page_size)) is not None:
                claim, claimed_blocks = found
                if not waited:
                    waited = True
                    self.metrics.inc("pdserve_shared_import_waits_total")
                    expected = claimed_blocks * page_size  # cached once the claims land
                    if not self.layerwise and not self._prefill_here(prompt_ids, expected):
                        early = self.calls.early(self.prefill, prompt_ids, params, request_id,
                                                 expected)
                try:
                    await asyncio.wait_for(claim.landed.wait(), deadline - time.monotonic())
                except TimeoutError:
                    break
                cached = self.engine.cached_prefix_tokens(prompt_ids, hashes)
        except BaseException:
            self.calls.abandon(early)
            raise
        return cached, early

    def _prefill_here(self, prompt_ids: list[int], cached: int) -> bool:
        """True when at most `local_prefill_max_tokens` of the prompt's tokens need computing
        here, `cached` of them being in the prefix cache (a hint: it is only about cost, not
        correctness)."""
        limit = self.local_prefill_max_tokens
        return limit > 0 and len(prompt_ids) - cached <= limit

    async def _fetch(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
                     rsv: Reservation, early: PrefillCall | None = None,
                     ) -> tuple[PrefillResult, KVPayload]:
        """The first token and the missing KV blocks, from `early` where it asked for the
        reservation's blocks, else from a new call; from another prefill replica if one is
        lost on the way."""
        if early is not None and early.first_block != rsv.first_block:
            self.calls.drop(early)
        # A dropped call may hold the request's id on its prefill replica a while yet (its
        # abort travels on its own): the new call goes under another.
        prefill_id = f"{request_id}-again" if early is not None and early.dropped else request_id
        for attempt in range(self.prefill_retries + 1):
            try:
                if self.layerwise:
                    return await self._fetch_layerwise(prompt_ids, params, request_id,
                                                       rsv)
                if attempt == 0 and early is not None and not early.dropped:
                    call = early
                else:
                    call = self.calls.start(self.prefill, prompt_ids, params, prefill_id,
                                            rsv.first_block)
                result = await self.calls.result(call)
                hop(request_id, "decode.prefill_done")
                # The receive places the pages on this replica's device (or straight into the
                # reserved pages: `receive_into`), off the engine loop; between two steps only
                # their scatter into the reserved pages (if still needed) runs.
                start = time.perf_counter()
                payload = await self._receive(result.kv, rsv)
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

    async def _fetch_layerwise(self, prompt_ids: list[int], params: SamplingParams,
                               request_id: str, rsv: Reservation,
                               ) -> tuple[PrefillResult, KVPayload]:
        """The KV handle comes before the prompt runs: its layers are received while the
        prefill replica computes them, then the first token comes."""
        hop(request_id, "decode.prefill_call")
        stream = self.prefill.prefill_stream(prompt_ids, params, request_id, rsv.first_block)
        try:
            handle = await anext(stream)
            hop(request_id, "decode.kv_handle")
            start = time.perf_counter()
            receive = asyncio.ensure_future(self._receive(handle, rsv))
            try:
                result = await anext(stream)
                hop(request_id, "decode.prefill_done")
                if not isinstance(result, PrefillResult):
                    raise TypeError(f"prefill stream sent {type(result).__name__} second")
                payload = await receive
            except BaseException:
                receive.cancel()
                await asyncio.gather(receive, return_exceptions=True)
                raise
        finally:
            await stream.aclose()
        # from the handle to the last layer: overlaps the prefill, so not a pure transfer time
        self.metrics.inc("pdserve_kv_transfer_seconds_total", time.perf_counter() - start)
        return result, payload

    async def _receive(self, handle: object, rsv: Reservation) -> KVPayload:
        if rsv.import_to is None:
            receive = self.transport.receive(handle, self.engine.device)
        else:
            receive = self.transport.receive_into(handle, rsv.import_to)
        # Awaited in this task, under a deadline: `asyncio.wait_for` (before Python 3.12) runs
        # it as a task of its own, and a cancellation that came before that task started would
        # leave the handle untaken, its pages held by the sender for its `timeout_s`.
        async with asyncio.timeout(self.timeout_s):
            return await receive

    async def _reserve(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       hashes: list[int] | None = None,
                       on_full: Callable[[], None] = lambda: None) -> Reservation:
        """Pages for the prompt; waits (bounded) while the pool is full of running requests,
        calling `on_full()` each time it finds it so."""
        deadline = time.monotonic() + self.reserve_timeout_s
        while True:
            try:
                rsv = await self.engine.reserve(request_id, prompt_ids, params, hashes)
            except asyncio.CancelledError:
                # Cancelled after the reservation ran but before this task resumed: undo it.
                # (Cancelled before it ran, `reserve` undoes it itself.)
                self.engine.end_import(request_id)  # no transport got it
                self.engine.abort(request_id)
                raise
            if rsv is not None:
                return rsv
            on_full()
            if time.monotonic() > deadline:
                raise TimeoutError(f"no KV pages free for {request_id} after "
                                   f"{self.reserve_timeout_s:.0f} s")
            await asyncio.sleep(0.01)

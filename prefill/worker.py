"""PrefillWorker: runs prompts (batched and chunked by the engine loop), samples the first token,
and hands the prompt's KV pages that the decode side lacks to the transport. No Ray here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

from engine.async_engine import AsyncEngine
from engine.metrics import Metrics
from engine.sampling_params import SamplingParams
from kvtransfer import KVPayload, KVTransport
from serving.pd_protocol import PrefillResult


class PrefillWorker:
    def __init__(self, engine: AsyncEngine, transport: KVTransport, fingerprint: str,
                 metrics: Metrics | None = None) -> None:
        self.engine = engine
        self.transport = transport
        self.fingerprint = fingerprint
        self.metrics = metrics or Metrics("prefill", "local")

    async def prefill(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
                      first_block: int = 0) -> PrefillResult:
        """Prefill `prompt_ids`, sample one token with `params`, export blocks >= first_block."""
        # Stop strings and length limits are the decode side's business: sample exactly one.
        one = dataclasses.replace(params, max_tokens=1, stop=[])
        self.metrics.inc("pdserve_requests_total")
        last = None
        async for out in self.engine.generate(prompt_ids, one, request_id,
                                              kv_export_from=first_block):
            last = out
        if last is None or last.kv is None:
            raise RuntimeError(f"prefill of {request_id} ended without a token")
        _, page_size = self.engine.kv_layout
        payload = KVPayload.from_tensor(last.kv.data, page_size, first_block,
                                        last.kv.block_hashes, self.fingerprint)
        # The hand-off (for the object store: device-to-host copies) runs in a thread, so the
        # engine loop keeps stepping other requests meanwhile.
        start = time.perf_counter()
        handle = await asyncio.to_thread(self.transport.send, payload)
        self.metrics.inc("pdserve_kv_transfer_send_seconds_total", time.perf_counter() - start)
        self.metrics.inc("pdserve_prompt_tokens_total", len(prompt_ids))
        self.metrics.inc("pdserve_kv_transfer_bytes_sent_total", payload.nbytes)
        return PrefillResult(last.new_token_ids[0], (last.new_logprobs or [None])[0],
                             handle, last.num_cached_tokens)

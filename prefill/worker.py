"""PrefillWorker: runs prompts (batched and chunked by the engine loop), samples the first token,
and hands the prompt's KV pages that the decode side lacks to the transport. Prompt logprobs
(`params.prompt_logprobs`) are computed here, as the prompt runs, and go back with the first
token in the PrefillResult. No Ray here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator

import torch

from engine.async_engine import AsyncEngine
from engine.block_hash import block_hashes
from engine.hop_log import hop
from engine.kv_stream import LayerwiseExport
from engine.metrics import Metrics
from engine.outputs import RequestOutput
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
        hop(request_id, "prefill.recv")
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
        start = time.perf_counter()
        handle = await self._send_or_discard(payload)
        self.metrics.inc("pdserve_kv_transfer_send_seconds_total", time.perf_counter() - start)
        self.metrics.inc("pdserve_prompt_tokens_total", len(prompt_ids))
        self.metrics.inc("pdserve_kv_transfer_bytes_sent_total", payload.nbytes)
        hop(request_id, "prefill.done")
        return _result(last, handle)

    async def _send_or_discard(self, payload: KVPayload) -> object:
        """The transport's handle for `payload`. The send (for the object store: device-to-host
        copies) runs in a thread, so the engine loop keeps stepping other requests meanwhile.
        A caller that leaves meanwhile (an abort, a dropped early call) does not stop that
        thread, and the handle it makes would reach nobody: the transport discards it once
        made, rather than hold the pages for its `timeout_s` (with `cuda_ipc`, 64 MiB of this
        GPU per 512-token Llama-3-8B prompt)."""
        send = asyncio.ensure_future(asyncio.to_thread(self._send, payload))
        try:
            return await asyncio.shield(send)
        except asyncio.CancelledError:
            send.add_done_callback(self._discard_sent)
            raise

    def _discard_sent(self, send: asyncio.Future) -> None:
        if not send.cancelled() and send.exception() is None:
            self.transport.discard(send.result())

    def _send(self, payload: KVPayload) -> object:
        """(A worker thread.) The transport's send, on the stream the pages were read out on,
        as its contract wants: the engine's export stream on a GPU. On the engine's own stream
        the KV would wait for the step launched since (engine/kv_export.py).
        Off CUDA there is none, and `torch.cuda.stream(None)` changes nothing."""
        with torch.cuda.stream(self.engine.export_stream):
            return self.transport.send(payload)

    async def prefill_stream(self, prompt_ids: list[int], params: SamplingParams,
                             request_id: str, first_block: int = 0,
                             ) -> AsyncIterator[object | PrefillResult]:
        """Layer-wise: yields the KV handle at once, before the prompt runs (the transport sends
        each layer as the engine computes it), then the PrefillResult (its `kv` None)."""
        hop(request_id, "prefill.recv")
        one = dataclasses.replace(params, max_tokens=1, stop=[])
        self.engine.validate(prompt_ids, one)  # nothing offered for a request that cannot run
        self.metrics.inc("pdserve_requests_total")
        dtype, page_size = self.engine.kv_layout
        num_pages = -(-len(prompt_ids) // page_size) - first_block
        export = LayerwiseExport(first_block, num_pages)
        meta = torch.empty(self.engine.kv_shape(num_pages), dtype=dtype, device="meta")
        header = KVPayload.from_tensor(meta, page_size, first_block,
                                       block_hashes(prompt_ids, page_size), self.fingerprint)
        yield self.transport.send_layerwise(header, export)
        last = None
        try:
            async for out in self.engine.generate(prompt_ids, one, request_id,
                                                  kv_export_from=first_block, kv_stream=export):
                last = out
        finally:
            if last is None or last.kv is None:  # failed, aborted, or the caller went away
                export.fail(f"prefill of {request_id} ended without its KV")
        if last is None or last.kv is None:
            raise RuntimeError(f"prefill of {request_id} ended without a token")
        self.metrics.inc("pdserve_prompt_tokens_total", len(prompt_ids))
        self.metrics.inc("pdserve_kv_transfer_bytes_sent_total", header.nbytes)
        hop(request_id, "prefill.done")
        yield _result(last, None)


def _result(last: RequestOutput, kv: object) -> PrefillResult:
    """What decode gets from the prefill's finishing output, with `kv` the transport handle."""
    return PrefillResult(last.new_token_ids[0], (last.new_logprobs or [None])[0], kv,
                         last.num_cached_tokens, last.prompt_logprobs)

"""The decode Serve deployment: DecodeWorker with the prefill deployment's handle."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from ray import serve

from decode.worker import DecodeWorker
from engine.sampling_params import SamplingParams
from kvtransfer import KVTransport, make_transport
from serving.batched_runs import Request
from serving.batched_submit import SubmitBatcher
from serving.pd_protocol import PrefillResult
from serving.replica import Replica, replica_lost
from serving.token_path import TokenAddress
from serving.token_socket import SocketReader

HEALTH_TIMEOUT_S = 5.0
log = logging.getLogger(__name__)


def prefill_batch(configured: int, transport: KVTransport) -> int:
    """Prompts a prefill call may carry: `decode.prefill_batch`, but one where the transport's
    handles hold Ray object refs (kvtransfer/transport.py says why)."""
    if configured > 1 and transport.handle_holds_object_refs:
        log.info("decode.prefill_batch %d: the %s transport's KV handles go one per prefill "
                 "call", configured, type(transport).__name__)
        return 1
    return configured


class PrefillClient:
    """The prefill deployment seen through its handle, as DecodeWorker expects it. With
    `max_batch` > 1, `prefill` calls go many to a Serve call (`prefill_many`, through a
    SubmitBatcher: serving/batched_submit.py), and their aborts over a token socket of this
    replica's that the prefill replicas connect to. Calls of one prompt (`prefill`, and the
    layer-streamed `prefill_stream`) carry that socket's address too, though their aborts go as
    Serve's cancellations: either way a prefill replica sees this one go when the socket
    closes, and aborts its prompts.

    An answer that comes after its caller left (the cancellation reached the prefill replica
    once it had answered) goes to `unclaimed`, which the owner of the answers' KV sets
    (decode/prefill_calls.py): on either path, else its KV would stay on the prefill replica."""

    def __init__(self, handle, timeout_s: float, max_batch: int = 1) -> None:
        self.handle = handle
        self.timeout_s = timeout_s
        self.unclaimed: Callable[[PrefillResult], None] | None = None
        self.reader = SocketReader()
        self.batcher = (None if max_batch == 1 else
                        SubmitBatcher(handle, self.reader, max_batch, method="prefill_many",
                                      sent_hop="decode.prefill_sent", unclaimed=self._came_late))

    async def prefill(self, *args):
        """The prefill's answer. Cancelled (or timed out) after the answer came, this returns
        it all the same: its KV waits on the prefill replica until received, and the caller
        must release it (decode/prefill_calls.py)."""
        if self.batcher is None:
            self.reader.start()  # the prefill replica connects to it for this call
            response = self.handle.prefill.remote(*args, address=self.reader.mailbox)
            answer = asyncio.ensure_future(response)
        else:
            response = self.batcher.run(*args)
            answer = response.future
        try:
            # Shielded: a timeout or this task's cancellation aborts the request on the prefill
            # replica through `cancel()`, and the answer may have come meanwhile.
            return await asyncio.wait_for(asyncio.shield(answer), self.timeout_s)
        except BaseException:
            if answer.done() and not answer.cancelled() and answer.exception() is None:
                return answer.result()
            response.cancel()
            if self.batcher is None:
                # Serve's response still ends with the answer where the replica had answered
                # before the cancellation came (the batcher sees to that on its own path).
                answer.add_done_callback(self._ended_after_cancel)
            raise

    def _ended_after_cancel(self, answer: asyncio.Future) -> None:
        if not answer.cancelled() and answer.exception() is None:
            self._came_late(answer.result())

    def _came_late(self, answer: PrefillResult) -> None:
        if self.unclaimed is None:
            log.warning("a prefill answer came after its caller left, and nothing releases "
                        "its KV")
            return
        self.unclaimed(answer)

    async def prefill_stream(self, *args):
        """The handle, then the result, from one prefill replica (one streaming call)."""
        self.reader.start()
        gen = self.handle.options(stream=True).prefill_stream.remote(
            *args, address=self.reader.mailbox)
        try:
            for _ in range(2):
                yield await asyncio.wait_for(gen.__anext__(), self.timeout_s)
        finally:
            gen.cancel()  # no-op once the call has ended; else the prefill is aborted

    def close(self) -> None:
        self.reader.shutdown()



@serve.deployment(name="decode")
class DecodeServer:
    def __init__(self, args: dict, prefill_handle) -> None:
        self.replica = Replica(args, "decode")
        self.prefill_handle = prefill_handle
        timeout_s = self.replica.cfg.request_timeout_s
        decode = self.replica.cfg.decode
        self.transport = make_transport(self.replica.cfg.kv_transport, timeout_s=timeout_s)
        self.prefill = PrefillClient(prefill_handle, timeout_s,
                                     prefill_batch(decode.prefill_batch, self.transport))
        self.worker = DecodeWorker(self.replica.engine, self.prefill, self.transport,
                                   self.replica.fingerprint, self.replica.metrics,
                                   reserve_timeout_s=min(60.0, timeout_s), timeout_s=timeout_s,
                                   retriable=replica_lost,
                                   local_prefill_max_tokens=decode.local_prefill_max_tokens)
        self.prefill.unclaimed = self.worker.calls.release

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str):
        async for out in self.worker.generate(prompt_ids, params, request_id):
            yield out

    async def run(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
                  mailbox: TokenAddress) -> None:
        """Generate with the outputs sent to `mailbox`, the ingress's token socket or mailbox
        (serving/token_path.py)."""
        await self.replica.run_into(mailbox, request_id, lambda sink: self.worker.generate(
            prompt_ids, params, request_id, sink))

    async def run_many(self, requests: list[Request], mailbox: TokenAddress):
        """`run` for many requests in one call (serving/batched_runs.py)."""
        async for item in self.replica.run_many(
                requests, mailbox, lambda r, sink: self.worker.generate(*r, sink)):
            yield item

    async def health(self) -> dict:
        """Ready when this replica and a prefill replica answer (raises otherwise)."""
        await asyncio.wait_for(self.prefill_handle.health.remote(), HEALTH_TIMEOUT_S)
        return self.replica.health()

    async def check_integrity(self) -> dict:
        return await self.replica.check_integrity()

    def record_autoscaling_stats(self) -> dict[str, float]:
        """The measures the SLO autoscaler reads (serving/replica.py)."""
        return self.replica.record_autoscaling_stats()

    def __del__(self) -> None:  # Serve's graceful shutdown hook
        self.prefill.close()
        self.transport.close()
        self.replica.close()

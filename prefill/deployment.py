"""The prefill Serve deployment: a thin wrapper around PrefillWorker."""

from __future__ import annotations

from ray import serve

from engine.sampling_params import SamplingParams
from kvtransfer import make_transport
from prefill.worker import PrefillWorker
from serving.batched_runs import Request
from serving.pd_protocol import PrefillResult
from serving.replica import Replica
from serving.token_socket import TokenSocket


@serve.deployment(name="prefill")
class PrefillServer:
    def __init__(self, args: dict) -> None:
        self.replica = Replica(args, "prefill")
        cfg = self.replica.cfg
        self.transport = make_transport(cfg.kv_transport, timeout_s=cfg.request_timeout_s)
        self.worker = PrefillWorker(self.replica.engine, self.transport,
                                    self.replica.fingerprint, self.replica.metrics)

    async def prefill(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
                      first_block: int, address: TokenSocket) -> PrefillResult:
        """One prompt's prefill, aborted if its caller goes: its token socket at `address`
        closes (serving/replica.py, `call_one`)."""
        return await self.replica.call_one(address, request_id, lambda: self.worker.prefill(
            prompt_ids, params, request_id, first_block))

    async def prefill_many(self, requests: list[Request], address: TokenSocket):
        """`prefill` for many requests in one call (serving/batched_runs.py): the count, then
        the results as they end; their aborts come over the caller's socket at `address`."""
        async for item in self.replica.call_many(requests, address,
                                                 lambda r: self.worker.prefill(*r)):
            yield item

    async def prefill_stream(self, prompt_ids: list[int], params: SamplingParams,
                             request_id: str, first_block: int, address: TokenSocket):
        """The KV handle first (layers follow as computed), then the PrefillResult; aborted
        if the caller goes, as `prefill`."""
        async for item in self.replica.stream_one(address, request_id, lambda: (
                self.worker.prefill_stream(prompt_ids, params, request_id, first_block))):
            yield item

    def health(self) -> dict:
        return self.replica.health()

    async def check_integrity(self) -> dict:
        return await self.replica.check_integrity()

    def record_autoscaling_stats(self) -> dict[str, float]:
        """The measures the SLO autoscaler reads (serving/replica.py)."""
        return self.replica.record_autoscaling_stats()

    def __del__(self) -> None:  # Serve's graceful shutdown hook
        self.transport.close()
        self.replica.close()

"""The colocated deployment: one engine does both phases (the baseline for every
disaggregation claim). Same `generate` stream as the decode deployment."""

from __future__ import annotations

import time

from ray import serve

from engine.metrics import track_stream
from engine.sampling_params import SamplingParams
from serving.batched_runs import Request
from serving.replica import Replica
from serving.token_path import TokenAddress


@serve.deployment(name="colocated")
class ColocatedServer:
    def __init__(self, args: dict) -> None:
        self.replica = Replica(args, "colocated")

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str):
        start = time.perf_counter()
        self._count(prompt_ids)
        stream = self.replica.engine.generate(prompt_ids, params, request_id)
        async for out in track_stream(stream, self.replica.metrics, start):
            yield out

    async def run(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
                  mailbox: TokenAddress) -> None:
        """Generate with the outputs sent to `mailbox`, the ingress's token socket or mailbox
        (serving/token_path.py)."""
        self._count(prompt_ids)
        await self.replica.run_into(mailbox, request_id, lambda sink: self.replica.engine.generate(
            prompt_ids, params, request_id, sink=sink))

    async def run_many(self, requests: list[Request], mailbox: TokenAddress):
        """`run` for many requests in one call (serving/batched_runs.py)."""
        for prompt_ids, _, _ in requests:
            self._count(prompt_ids)
        async for item in self.replica.run_many(
                requests, mailbox, lambda r, sink: self.replica.engine.generate(*r, sink=sink)):
            yield item

    def _count(self, prompt_ids: list[int]) -> None:
        self.replica.metrics.inc("pdserve_requests_total")
        self.replica.metrics.inc("pdserve_prompt_tokens_total", len(prompt_ids))

    def health(self) -> dict:
        return self.replica.health()

    async def check_integrity(self) -> dict:
        return await self.replica.check_integrity()

    def __del__(self) -> None:  # Serve's graceful shutdown hook
        self.replica.close()

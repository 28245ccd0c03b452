"""The decode Serve deployment: DecodeWorker with the prefill deployment's handle."""

from __future__ import annotations

import asyncio

from ray import serve

from cluster.replica import Replica
from decode.worker import DecodeWorker
from engine.sampling_params import SamplingParams
from kvtransfer import make_transport


class PrefillClient:
    """The prefill deployment seen through its handle, as DecodeWorker expects it."""

    def __init__(self, handle, timeout_s: float) -> None:
        self.handle = handle
        self.timeout_s = timeout_s

    async def prefill(self, *args):
        return await asyncio.wait_for(self.handle.prefill.remote(*args), self.timeout_s)


@serve.deployment(name="decode")
class DecodeServer:
    def __init__(self, args: dict, prefill_handle) -> None:
        self.replica = Replica(args, "decode")
        prefill = PrefillClient(prefill_handle, self.replica.cfg.request_timeout_s)
        self.worker = DecodeWorker(self.replica.engine, prefill,
                                   make_transport(self.replica.cfg.kv_transport),
                                   self.replica.fingerprint, self.replica.metrics)

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str):
        async for out in self.worker.generate(prompt_ids, params, request_id):
            yield out

    def check_integrity(self) -> dict:
        return self.replica.check_integrity()

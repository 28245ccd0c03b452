"""A prefill and a decode worker in one process under random traffic: prompts on a few shared
prefixes (imports that wait for each other's blocks, prefix-cache hits, local prefills of short
uncached tails), started in random order, some cancelled before their first token or part-way,
in a pool small enough to fill.

Whatever the interleaving of the event loop and the two step threads:
- every request that ran to its end streamed exactly the tokens `LLM` gives for its prompt;
- afterwards both engines hold no pages and pass the integrity audit, no import claim is left
  on the decode replica, and every KV handle the prefill side made was received once or
  discarded once, never both and never left held (one owner for each export).
"""

from __future__ import annotations

import asyncio
import random

import pytest

from decode.worker import DecodeWorker
from engine.async_engine import AsyncEngine
from engine.config import EngineConfig, ModelConfig
from engine.llm import LLM
from engine.llm_engine import Engine
from engine.sampling_params import SamplingParams
from kvtransfer import KVPayload, model_fingerprint
from kvtransfer.inline import InlineTransport
from prefill.worker import PrefillWorker

PS = 16
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
HANG_S = 120  # a hang guard, not a speed bound


class Counted(InlineTransport):
    """The inline transport, noting each handle as it is made, received and discarded (the
    lists keep them alive, so their ids stay unique)."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[object] = []
        self.received: list[object] = []
        self.discarded: list[object] = []

    def send(self, payload: KVPayload) -> object:
        self.sent.append(payload)
        return payload

    async def receive(self, handle: object, device) -> KVPayload:
        self.received.append(handle)
        return await super().receive(handle, device)

    def discard(self, handle: object) -> None:
        self.discarded.append(handle)


def traffic(seed: int, n: int = 24) -> list[list[int]]:
    rng = random.Random(seed)
    prefixes = [[rng.randrange(300, 900) for _ in range(k * PS)] for k in (1, 3, 4)]
    prompts = []
    for _ in range(n):
        prefix = rng.choice([[], *prefixes])
        tail = rng.choice([3, 10, 20, 40])  # <= 16: prefilled on the decode replica if cached
        prompts.append(prefix + [rng.randrange(900, 1000) for _ in range(tail)])
    return prompts


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_traffic_streams_the_reference_tokens_and_leaves_nothing_behind(
        tiny_llama, seed: int) -> None:
    prompts = traffic(seed)
    reference = [c.token_ids for c in LLM(tiny_llama, num_pages=128).generate(prompts, GREEDY)]
    rng = random.Random(1000 + seed)
    # Per request: cancel it after this many outputs (None: let it finish; 0: before any).
    cancel_after = [rng.choice([None, None, None, 0, 2]) for _ in prompts]
    start_yields = [rng.randrange(0, 4) for _ in prompts]

    async def one(decode: DecodeWorker, i: int) -> list[int]:
        for _ in range(start_yields[i]):
            await asyncio.sleep(0)  # mixes the order in which requests set out
        got: list[int] = []
        stream = decode.generate(prompts[i], GREEDY, f"r{i}")
        try:
            async for out in stream:
                got += out.new_token_ids
                if cancel_after[i] and len(got) >= cancel_after[i]:
                    break  # the client leaves part-way
        finally:
            await stream.aclose()
        return got

    async def main():
        transport = Counted()
        fp = model_fingerprint(tiny_llama, "float32", "safetensors", 0)
        prefill = PrefillWorker(AsyncEngine(Engine(ModelConfig(tiny_llama), EngineConfig(
            page_size=PS, num_pages=48))), transport, fp)
        # 40 pages: the prompts' distinct blocks do not all fit, so the prefix cache evicts
        # and reservations sometimes wait for pages.
        decode = DecodeWorker(AsyncEngine(Engine(ModelConfig(tiny_llama), EngineConfig(
            page_size=PS, num_pages=40, enable_prefix_caching=True))), prefill, transport, fp,
            timeout_s=HANG_S, local_prefill_max_tokens=16)
        tasks = [asyncio.ensure_future(one(decode, i)) for i in range(len(prompts))]
        # A cancellation before the first token comes from outside, as a client leaving does,
        # after a random number of turns of the event loop: while the request waits for a
        # claim, for its reservation, for its prefill, or before it set out.
        async def leave(task: asyncio.Task, turns: int) -> None:
            for _ in range(turns):
                await asyncio.sleep(0)
            task.cancel()

        leaving = [asyncio.ensure_future(leave(tasks[i], rng.randrange(0, 40)))
                   for i, after in enumerate(cancel_after) if after == 0]
        await asyncio.gather(*leaving)
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), HANG_S)
        # The last aborts and undos may still be on their way to the step threads (a
        # reservation whose caller left as it was made is undone from the caller's loop), and
        # dropped calls' answers still being thrown away: wait until all is quiet.
        for _ in range(HANG_S * 100):  # a hang guard, not a speed bound
            stats = [await w.engine.check_integrity() for w in (prefill, decode)]
            if not decode.calls.releases and all(s.pages_used == 0 for s in stats):
                break
            await asyncio.sleep(0.01)
        return results, stats, len(decode.imports), decode.metrics.counters, transport

    results, stats, claims_left, counters, transport = asyncio.run(main())
    for i, got in enumerate(results):
        if isinstance(got, BaseException):
            assert isinstance(got, asyncio.CancelledError) and cancel_after[i] == 0, (i, got)
        elif cancel_after[i] in (None, 0):  # ran to its end (0: before its client left)
            assert got == reference[i], f"request {i}"
        else:
            assert got == reference[i][:len(got)], f"request {i}"
    assert [s.pages_used for s in stats] == [0, 0]
    assert claims_left == 0
    ended = [id(h) for h in transport.received + transport.discarded]
    assert sorted(ended) == sorted(id(h) for h in transport.sent)
    assert len(set(ended)) == len(ended)
    # The traffic did what it is for: shared prefixes found cached, tails prefilled here.
    assert counters.get("pdserve_kv_transfer_blocks_skipped_total", 0) > 0
    assert counters.get("pdserve_local_prefills_total", 0) > 0

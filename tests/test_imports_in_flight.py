"""Requests that share a prompt prefix on one decode replica fetch it once: while one imports
blocks that another lacks, the other waits until they are in the prefix cache, then fetches
only its own blocks (decode/imports_in_flight.py). A leader that fails wakes its followers,
which then fetch the prefix themselves; without a prefix cache nobody waits."""

from __future__ import annotations

import asyncio
import math
import random

import pytest

from decode.imports_in_flight import ImportsInFlight
from decode.worker import DecodeWorker
from engine.async_engine import AsyncEngine
from engine.block_hash import block_hashes
from engine.config import EngineConfig, ModelConfig
from engine.llm import LLM
from engine.llm_engine import Engine
from engine.sampling_params import SamplingParams
from kvtransfer import KVPayload, model_fingerprint
from kvtransfer.inline import InlineTransport
from prefill.worker import PrefillWorker

PS = 16
SHARED = list(range(300, 300 + 4 * PS))  # 4 full pages
LEADER = SHARED + list(range(700, 740))  # + 2 full pages + 8 tokens of its own
FOLLOWER = SHARED + list(range(800, 830))  # + 1 full page + 14 tokens of its own
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
HANG_S = 60  # a hang guard, not a speed bound


# -- the index, as plain data --------------------------------------------------------------
def test_a_prompt_waits_for_the_deepest_block_in_flight_past_its_cached_ones():
    imports = ImportsInFlight()
    lead = block_hashes(LEADER, PS)  # 6 blocks
    follow = block_hashes(FOLLOWER, PS)  # 5 blocks, 0-3 shared with the leader
    claim = imports.add(lead[1:])  # block 0 was cached: it fetches blocks 1-5
    assert claim.hashes == lead[1:] and len(imports) == 5
    # The follower shares blocks 0-3; block 0 is cached, 1-3 are in flight.
    assert imports.blocking(follow, cached_blocks=1) == (claim, 4)
    # Without block 0 cached, the walk stops there: block 0 is nobody's import.
    assert imports.blocking(follow, cached_blocks=0) is None
    assert imports.blocking(block_hashes(list(range(900, 980)), PS), cached_blocks=0) is None
    # A second request on the same prompt claims only what nobody claimed.
    second = imports.add(follow)
    assert second.hashes == [follow[0], follow[4]]
    assert imports.blocking(follow, cached_blocks=0) == (second, 5)  # block 4 is deepest
    imports.done(claim)
    assert claim.landed.is_set() and not second.landed.is_set() and len(imports) == 2
    imports.done(claim)  # a second time changes nothing
    assert len(imports) == 2
    imports.done(second)
    assert len(imports) == 0 and imports.blocking(follow, cached_blocks=1) is None


# -- two requests on one decode replica ----------------------------------------------------
class FirstReceiveGated(InlineTransport):
    """The inline transport; its first receive waits until `gate` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.receives = 0

    async def receive(self, handle: object, device) -> KVPayload:
        self.receives += 1
        if self.receives == 1:
            await self.gate.wait()
        return await super().receive(handle, device)


class Calls:
    """The prefill worker, noting each call's (request id, first block) as it goes out."""

    def __init__(self, worker: PrefillWorker) -> None:
        self.worker, self.made = worker, []

    async def prefill(self, prompt_ids, params, request_id, first_block=0):
        self.made.append((request_id, first_block))
        return await self.worker.prefill(prompt_ids, params, request_id, first_block)


def workers(path: str, transport: FirstReceiveGated, prefix_caching: bool = True):
    fp = model_fingerprint(path, "float32", "safetensors", 0)
    prefill = PrefillWorker(AsyncEngine(Engine(ModelConfig(path), EngineConfig(
        page_size=PS, num_pages=64))), transport, fp)
    decode = DecodeWorker(AsyncEngine(Engine(ModelConfig(path), EngineConfig(
        page_size=PS, num_pages=64, enable_prefix_caching=prefix_caching))), Calls(prefill),
        transport, fp, timeout_s=HANG_S)
    return prefill, decode


async def until(cond) -> None:
    for _ in range(HANG_S * 100):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


async def tokens(decode: DecodeWorker, prompt: list[int], rid: str) -> list[int]:
    return [t async for out in decode.generate(prompt, GREEDY, rid) for t in out.new_token_ids]


def page_bytes(decode: DecodeWorker) -> int:
    """Bytes of one page's KV (float32) as the transport moves it."""
    return math.prod(decode.engine.kv_shape(1)) * 4


async def clean(*ws) -> None:
    for w in ws:
        await w.engine.check_integrity()
        assert w.engine.stats().pages_used == 0


@pytest.fixture(scope="module")
def reference(tiny_llama) -> dict[str, list[int]]:
    outs = LLM(tiny_llama, num_pages=64).generate([LEADER, FOLLOWER], GREEDY)
    return {"leader": outs[0].token_ids, "follower": outs[1].token_ids}


def test_a_follower_waits_for_the_shared_blocks_then_fetches_only_its_own(tiny_llama,
                                                                          reference):
    async def main():
        transport = FirstReceiveGated()
        prefill, decode = workers(tiny_llama, transport)
        leader = asyncio.ensure_future(tokens(decode, LEADER, "leader"))
        await until(lambda: transport.receives == 1)  # its KV is held at the gate
        follower = asyncio.ensure_future(tokens(decode, FOLLOWER, "follower"))
        counters = decode.metrics.counters
        await until(lambda: counters.get("pdserve_shared_import_waits_total") == 1)
        # Waiting, it holds no pages, and its prefill call for the blocks past the claimed
        # prefix is out already: it does not queue behind the leader's admission.
        assert list(decode.engine.engine.scheduler.reserved) == ["leader"]
        assert decode.prefill.made == [("leader", 0), ("follower", 4)]
        transport.gate.set()
        got = {"leader": await leader, "follower": await follower}
        await clean(prefill, decode)
        return got, counters, page_bytes(decode), decode.prefill.made

    got, counters, one_page, made = asyncio.run(main())
    assert got == reference
    assert made == [("leader", 0), ("follower", 4)]  # that call was used: no second one
    assert "pdserve_prefill_calls_dropped_total" not in counters
    assert counters["pdserve_shared_import_waits_total"] == 1
    assert counters["pdserve_kv_transfer_blocks_skipped_total"] == 4  # the follower's prefix
    # The leader's 7 pages, then the follower's last full page and its partial one.
    assert counters["pdserve_kv_transfer_bytes_total"] == (7 + 2) * one_page


def test_requests_that_come_together_fetch_the_shared_blocks_once(tiny_llama, reference):
    """As the requests of one Serve call of many start: the first claims the blocks before
    anything is awaited, so the second, started right after, finds the claim."""
    async def main():
        transport = FirstReceiveGated()
        transport.gate.set()
        prefill, decode = workers(tiny_llama, transport)
        got = await asyncio.gather(tokens(decode, LEADER, "leader"),
                                   tokens(decode, FOLLOWER, "follower"))
        await clean(prefill, decode)
        return got, decode.metrics.counters, page_bytes(decode)

    got, counters, one_page = asyncio.run(main())
    assert got == [reference["leader"], reference["follower"]]
    assert counters["pdserve_shared_import_waits_total"] == 1
    assert counters["pdserve_kv_transfer_bytes_total"] == (7 + 2) * one_page


def test_a_leader_that_fails_wakes_its_followers_which_fetch_the_prefix(tiny_llama, reference):
    async def main():
        transport = FirstReceiveGated()
        prefill, decode = workers(tiny_llama, transport)
        leader = asyncio.ensure_future(tokens(decode, LEADER, "leader"))
        await until(lambda: transport.receives == 1)
        follower = asyncio.ensure_future(tokens(decode, FOLLOWER, "follower"))
        counters = decode.metrics.counters
        await until(lambda: counters.get("pdserve_shared_import_waits_total") == 1)
        leader.cancel()  # its client went away while its KV was on the way
        await asyncio.gather(leader, return_exceptions=True)
        got = await asyncio.wait_for(follower, HANG_S)
        transport.gate.set()  # the leader's receive, cancelled, never comes back here
        await clean(prefill, decode)
        return got, counters, page_bytes(decode)

    got, counters, one_page = asyncio.run(main())
    assert got == reference["follower"]
    assert counters["pdserve_kv_transfer_blocks_skipped_total"] == 0
    assert counters["pdserve_kv_transfer_bytes_total"] == 6 * one_page  # all its pages
    # The call it made while waiting, for blocks 4 on, was dropped for one for all its blocks.
    assert counters["pdserve_prefill_calls_dropped_total"] == 1


def test_without_a_prefix_cache_nobody_waits(tiny_llama, reference):
    async def main():
        transport = FirstReceiveGated()
        prefill, decode = workers(tiny_llama, transport, prefix_caching=False)
        leader = asyncio.ensure_future(tokens(decode, LEADER, "leader"))
        await until(lambda: transport.receives == 1)
        # The leader's pages would not be cached: the follower fetches its prompt at once.
        got = await asyncio.wait_for(tokens(decode, FOLLOWER, "follower"), HANG_S)
        transport.gate.set()
        got_leader = await leader
        await clean(prefill, decode)
        return got, got_leader, decode.metrics.counters

    got, got_leader, counters = asyncio.run(main())
    assert got == reference["follower"] and got_leader == reference["leader"]
    assert "pdserve_shared_import_waits_total" not in counters


def test_a_burst_with_clients_leaving_at_random_leaves_nothing_behind(tiny_llama, reference):
    """Twelve requests on the two prompts, a third of them cancelled at seeded points of their
    run (waiting for a claim, fetching, decoding): the rest get their tokens, and no page,
    claim or wait is left on either replica."""
    rng = random.Random(7)
    plan = [("leader" if i % 2 else "follower", rng.random() < 1 / 3, rng.randrange(40))
            for i in range(12)]

    async def main():
        transport = FirstReceiveGated()
        transport.gate.set()
        prefill, decode = workers(tiny_llama, transport)
        prompts = {"leader": LEADER, "follower": FOLLOWER}
        tasks = [asyncio.ensure_future(tokens(decode, prompts[kind], f"r{i}"))
                 for i, (kind, _, _) in enumerate(plan)]
        for tick in range(40):
            for task, (_, cancel, at) in zip(tasks, plan):
                if cancel and at == tick:
                    task.cancel()
            await asyncio.sleep(0)
        got = await asyncio.gather(*tasks, return_exceptions=True)
        await clean(prefill, decode)
        return got, decode, prefill

    got, decode, prefill = asyncio.run(main())
    for (kind, cancel, _), out in zip(plan, got):
        if not cancel:
            assert out == reference[kind]
    assert any(cancel for _, cancel, _ in plan)
    assert len(decode.imports) == 0
    for w in (decode, prefill):
        assert w.engine.engine.scheduler.kv.claims == {}

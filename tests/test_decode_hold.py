"""The decode hold as a spec (engine/decode_hold.py): when a decode step waits for the prompts
reserved on its replica, for how long, and what ends the wait; then in the scheduler, and in a
decode worker whose step thread waits for an admission instead of stepping."""

from __future__ import annotations

import asyncio

import pytest

from decode.worker import DecodeWorker
from engine.async_engine import AsyncEngine
from engine.batch import ModelOutput
from engine.block_allocator import BlockAllocator
from engine.config import ConfigFieldError, EngineConfig, ModelConfig
from engine.decode_hold import DecodeHold
from engine.llm import LLM
from engine.llm_engine import Engine
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from kvtransfer import make_transport, model_fingerprint
from prefill.worker import PrefillWorker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_step_waits_while_the_reserved_prompts_would_at_least_double_the_batch():
    clock = Clock()
    hold = DecodeHold(0.5, clock)
    assert hold.wait_s(running=4, reserved=3, prompts=0) == 0  # would not double: step
    assert hold.wait_s(running=0, reserved=9, prompts=0) == 0  # no row to step
    assert hold.wait_s(running=4, reserved=9, prompts=1) == 0  # a prompt of its own runs
    assert hold.num_holds == 0
    assert hold.wait_s(running=4, reserved=4, prompts=0) == 0.5  # the hold begins
    clock.now += 0.2
    assert hold.wait_s(running=5, reserved=3, prompts=0) == 0  # the rows came: over
    assert hold.wait_s(running=5, reserved=6, prompts=0) == 0.5  # a new burst: a new hold
    clock.now += 0.375
    assert hold.wait_s(running=5, reserved=6, prompts=0) == pytest.approx(0.125)
    clock.now += 0.125
    assert hold.wait_s(running=5, reserved=6, prompts=0) == 0  # at most max_wait_s
    hold.launched()  # the step went: the next one may be held again, from now
    assert hold.wait_s(running=5, reserved=6, prompts=0) == 0.5
    assert hold.num_holds == 3


def test_zero_never_holds_and_a_negative_wait_is_refused():
    hold = DecodeHold(0.0, Clock())
    assert hold.wait_s(running=1, reserved=100, prompts=0) == 0 and hold.num_holds == 0
    assert EngineConfig().decode_hold_ms == 0
    with pytest.raises(ConfigFieldError, match="decode_hold_ms"):
        EngineConfig(decode_hold_ms=-1)


def test_the_scheduler_launches_nothing_while_it_holds_then_the_whole_batch():
    clock = Clock()
    cfg = EngineConfig(page_size=4, num_pages=16, decode_hold_ms=250)
    sched = Scheduler(cfg, BlockAllocator(16, 4), max_model_len=64)
    sched.hold.clock = clock
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    a, b = Request("a", [1, 2, 3, 4, 5], params), Request("b", [6, 7, 8], params)
    for req in (a, b):
        assert sched.reserve(req) is not None
    sched.import_done(a, first_block=0)
    sched.admit(a, first_token=40)  # 1 running, 1 reserved: held
    assert sched.schedule().requests == [] and sched.hold_s() == 0.25
    clock.now += 0.1
    sched.import_done(b, first_block=0)
    sched.admit(b, first_token=41)  # 2 running, 0 reserved: both step together
    batch = sched.schedule()
    assert [r.request_id for r in batch.requests] == ["a", "b"] and batch.num_new_tokens == [1, 1]
    sched.update(batch, ModelOutput([50, 51]))
    assert a.output_token_ids == [40, 50] and b.output_token_ids == [41, 51]
    # a third prompt reserved now does not double the batch of two: no hold
    c = Request("c", [9], params)
    assert sched.reserve(c) is not None and sched.hold_s() == 0
    assert sched.hold.num_holds == 1
    sched.check_integrity()


def test_a_prompt_of_its_own_part_way_through_is_never_held():
    clock = Clock()
    cfg = EngineConfig(page_size=4, num_pages=32, max_num_batched_tokens=4, decode_hold_ms=250)
    sched = Scheduler(cfg, BlockAllocator(32, 4), max_model_len=64)
    sched.hold.clock = clock
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    local = Request("local", list(range(10)), params)  # prefilled here, 4 tokens a step
    sched.add(local)
    batch = sched.schedule()
    assert batch.num_new_tokens == [4]
    sched.update(batch, ModelOutput([None]))
    for rid in ("x", "y"):  # two prompts on their way: more than the one running row
        assert sched.reserve(Request(rid, [1, 2, 3], params)) is not None
    batch = sched.schedule()  # the prompt goes on: not held
    assert [r.request_id for r in batch.requests] == ["local"] and batch.num_new_tokens == [4]
    sched.update(batch, ModelOutput([None]))
    batch = sched.schedule()  # its last 2 prompt tokens, which sample its first token
    assert batch.num_new_tokens == [2]
    sched.update(batch, ModelOutput([60]))
    assert sched.schedule().requests == []  # now a decode row, and held
    assert sched.hold.num_holds == 1


GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


class GatedPrefill:
    """A prefill worker whose answer for the request ids in `gated` waits for `gate`."""

    def __init__(self, inner: PrefillWorker, gated: set[str]) -> None:
        self.inner, self.gated, self.gate = inner, gated, asyncio.Event()

    async def prefill(self, prompt_ids, params, request_id, first_block=0):
        if request_id in self.gated:
            await self.gate.wait()
        return await self.inner.prefill(prompt_ids, params, request_id, first_block)

    def prefill_stream(self, *args, **kwargs):
        raise NotImplementedError("the inline transport does not stream layers")


def gated_pair(path: str, hold_ms: float, gated: set[str]) -> tuple[GatedPrefill, DecodeWorker]:
    cfg = EngineConfig(page_size=16, num_pages=64)
    fp = model_fingerprint(path, "float32", "safetensors", 0)
    transport = make_transport("inline")
    prefill = GatedPrefill(PrefillWorker(AsyncEngine(Engine(ModelConfig(path), cfg)),
                                         transport, fp), gated)
    decode_cfg = EngineConfig(page_size=16, num_pages=64, decode_hold_ms=hold_ms)
    decode = DecodeWorker(AsyncEngine(Engine(ModelConfig(path), decode_cfg)), prefill,
                          transport, fp)
    return prefill, decode


async def reserved(decode: DecodeWorker, request_id: str) -> None:
    """Until the decode engine has reserved pages for request_id (its KV on the way)."""
    for _ in range(2000):
        if request_id in decode.engine.engine.scheduler.reserved:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"{request_id} was never reserved")


async def outputs_of(decode: DecodeWorker, prompt: list[int], request_id: str, seen: list):
    async for out in decode.generate(prompt, GREEDY, request_id):
        seen.append(out)


PA, PB = [5, 6, 7, 8, 9], list(range(20, 40))  # requests "a" and "b"


def same_tokens_as_colocated_and_pages_back(path: str, decode: DecodeWorker, a_out: list,
                                            b_out: list) -> None:
    ref = LLM(path, num_pages=64).generate([PA, PB], GREEDY)
    assert [t for o in a_out for t in o.new_token_ids] == ref[0].token_ids
    assert [t for o in b_out for t in o.new_token_ids] == ref[1].token_ids
    decode.engine.engine.check_integrity()
    assert decode.engine.stats().pages_used == 0


def test_a_decode_replica_holds_its_first_row_until_the_reserved_prompt_lands(tiny_llama):
    """With a hold longer than the test, only the admission of the reserved prompt ends it:
    the first request's first token comes at once (with its KV), its second only once the
    second request has joined, and both decode the colocated engine's tokens."""

    async def main():
        prefill, decode = gated_pair(tiny_llama, hold_ms=600_000, gated={"b"})
        a_out, b_out = [], []
        b = asyncio.create_task(outputs_of(decode, PB, "b", b_out))
        await reserved(decode, "b")
        a = asyncio.create_task(outputs_of(decode, PA, "a", a_out))
        while not a_out:
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.3)  # a step would have come by now, were a not held
        held = ([t for o in a_out for t in o.new_token_ids], decode.engine.stepper.num_steps)
        prefill.gate.set()
        await asyncio.gather(a, b)
        return decode, held, a_out, b_out

    decode, (a_held, steps_held), a_out, b_out = asyncio.run(main())
    assert len(a_held) == 1 and steps_held == 0
    same_tokens_as_colocated_and_pages_back(tiny_llama, decode, a_out, b_out)
    counters = decode.engine.stepper.counters()
    assert counters["pdserve_engine_decode_holds_total"] == 1
    assert counters["pdserve_engine_decode_hold_seconds_total"] > 0  # waited for b's admission


def test_a_short_hold_lets_the_rows_decode_while_the_reserved_prompt_never_lands(tiny_llama):
    """The hold is bounded: with the second prompt's prefill held back until the first request
    has ended, the first still decodes all its tokens, one hold before each of its steps."""

    async def main():
        prefill, decode = gated_pair(tiny_llama, hold_ms=20, gated={"b"})
        a_out, b_out = [], []
        b = asyncio.create_task(outputs_of(decode, PB, "b", b_out))
        await reserved(decode, "b")
        await outputs_of(decode, PA, "a", a_out)
        holds = decode.engine.stepper.counters()["pdserve_engine_decode_holds_total"]
        b_before = len(b_out)
        prefill.gate.set()
        await b
        return decode, holds, b_before, a_out, b_out

    decode, holds, b_before, a_out, b_out = asyncio.run(main())
    assert b_before == 0  # b's prefill was still held back when a ended
    assert holds == 5  # before each of a's 5 decode steps (its first token came with its KV)
    same_tokens_as_colocated_and_pages_back(tiny_llama, decode, a_out, b_out)

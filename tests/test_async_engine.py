"""The AsyncEngine's step thread: it runs while there is work, leaves when idle, applies what
was submitted before `close`, and undoes the work of callers that went away."""

from __future__ import annotations

import asyncio
import json
import threading

from engine.async_engine import AsyncEngine
from engine.llm import LLM
from engine.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


async def _tokens(engine: AsyncEngine, prompt: list[int], request_id: str) -> list[int]:
    return [t async for out in engine.generate(prompt, GREEDY, request_id)
            for t in out.new_token_ids]


async def _until(predicate, what: str) -> None:
    for _ in range(3000):  # a hang guard, not a timing bound
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never: {what}")


def test_the_step_thread_leaves_when_idle_and_comes_back(tiny_llama):
    llm = LLM(tiny_llama, num_pages=64)
    ref = llm.generate([[5, 6, 7]], GREEDY)[0].token_ids

    async def main() -> None:
        engine = AsyncEngine(llm.engine)
        assert await _tokens(engine, [5, 6, 7], "a") == ref
        first = engine.stepper.thread
        await _until(lambda: not first.is_alive(), "the idle step thread left")
        assert await _tokens(engine, [5, 6, 7], "b") == ref  # a new thread serves it
        assert engine.stepper.thread is not first
        engine.close()
        assert not engine.stepper.thread.is_alive()

    asyncio.run(main())
    assert llm.engine.num_pages_used == 0


def test_close_applies_what_was_submitted_before_it(tiny_llama):
    llm = LLM(tiny_llama, num_pages=64)
    long = SamplingParams(max_tokens=900, temperature=0.0, ignore_eos=True)

    async def main() -> None:
        engine = AsyncEngine(llm.engine)
        outs = engine.generate([5, 6, 7], long, "long")
        await anext(outs)  # running
        engine.abort("long")
        engine.close()  # returns once the abort is applied and the thread is gone
        assert not engine.stepper.thread.is_alive()
        assert not llm.engine.has_unfinished() and llm.engine.num_pages_used == 0
        await outs.aclose()

    asyncio.run(main())


def test_a_caller_cancelled_before_its_call_ran_leaves_nothing_reserved(tiny_llama):
    llm = LLM(tiny_llama, num_pages=64)

    async def main() -> None:
        engine = AsyncEngine(llm.engine)
        gate = threading.Event()
        engine.run_soon(lambda: gate.wait(60))  # holds the step thread
        call = asyncio.ensure_future(engine.reserve("r", [5] * 40, GREEDY))
        await asyncio.sleep(0.05)
        call.cancel()  # before the reservation was made: it is made, then undone
        gate.set()
        stats = await engine.check_integrity()
        assert stats.pages_used == 0
        ok = await engine.reserve("r2", [5] * 40, GREEDY)  # a caller that stays gets it
        assert ok is not None and llm.engine.num_pages_used == 3
        engine.abort("r2")
        assert (await engine.check_integrity()).pages_used == 0
        engine.close()

    asyncio.run(main())


def test_the_step_log_has_a_line_per_step_with_what_it_launched(tiny_llama, tmp_path,
                                                                  monkeypatch):
    monkeypatch.setenv("PDSERVE_STEP_LOG", str(tmp_path))
    llm = LLM(tiny_llama, num_pages=64)
    engine = AsyncEngine(llm.engine)

    async def main() -> None:
        await asyncio.gather(_tokens(engine, [5, 6, 7], "a"), _tokens(engine, [8, 9], "b"))
        engine.close()

    asyncio.run(main())
    [path] = tmp_path.iterdir()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == engine.stepper.num_steps
    # 5 prompt tokens, then 3 decode rows for each request's 2nd-4th tokens
    assert sum(r["prefill"] for r in lines) == 5 and sum(r["decode"] for r in lines) == 6
    assert sum(r["actions"] for r in lines) >= 1 and lines[-1]["running"] == 0
    # the step thread's CPU time is within the step's wall time (plus the clocks' resolution)
    assert all(0 <= r["cpu_s"] <= r["step_s"] + 0.002 and r["gc_s"] >= 0 for r in lines)
    assert not any("device_s" in r for r in lines)  # steps are timed on a CUDA device only
    assert engine.stepper.device_seconds == 0.0
    counters = engine.stepper.counters()  # what /metrics shows of them
    assert counters["pdserve_engine_steps_total"] == len(lines)
    assert counters["pdserve_engine_device_seconds_total"] == 0.0

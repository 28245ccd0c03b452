"""Steps timed on a GPU: each step-log line holds the device time of the steps that ended since
the round before (`device_s`), each from just before its forward was queued to its sampled
ids, and the AsyncEngine sums them (`device_seconds`, /metrics'
`pdserve_engine_device_seconds_total`)."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig, ModelConfig
from engine.llm_engine import Engine
from engine.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_each_step_is_timed_on_the_device_and_a_busy_gpu_before_it_does_not_count(
        tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("PDSERVE_STEP_LOG", str(tmp_path))
    engine = AsyncEngine(Engine(ModelConfig(tiny_llama, device="cuda", dtype="float32"),
                                EngineConfig(page_size=16, num_pages=64, overlap_scheduling="on",
                                             attention_backend="torch")))
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    sleep = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))

    async def main() -> int:
        # A first request takes the first-use costs (library handles, allocations) that its
        # steps' device time holds while the host sets them up (run 154: 0.6 s on an H100).
        async for _ in engine.generate([1, 2], params, "warm"):
            pass
        warm_lines = len(list(tmp_path.iterdir())[0].read_text().splitlines())
        # GPU time queued before the request's first step: the step's forward is queued
        # behind it, and its device time starts only once that kernel is done
        sleep[0].record()
        torch.cuda._sleep(200_000_000)
        sleep[1].record()
        async for _ in engine.generate([5, 6, 7], params, "r"):
            pass
        engine.close()
        return warm_lines

    warm_lines = asyncio.run(main())
    torch.cuda.synchronize()
    [path] = tmp_path.iterdir()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    warm, lines = lines[:warm_lines], lines[warm_lines:]
    # 5 rounds (the prompt's step launched, then each round collects the step before it),
    # every one timed
    assert len(lines) == 5 and all("device_s" in r for r in lines)
    total = sum(r["device_s"] for r in lines)
    # the kernel queued before the first step is in no step's time: the 4 steps of a toy model
    # take a small part of it (the measured sleep: ~0.1-0.2 s)
    sleep_s = sleep[0].elapsed_time(sleep[1]) / 1e3
    assert 0 < total < sleep_s / 2
    assert engine.stepper.device_seconds == pytest.approx(
        total + sum(r["device_s"] for r in warm), abs=1e-5)

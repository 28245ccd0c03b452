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

    async def main() -> None:
        # ~0.1-0.2 s of GPU time queued before the request's first step: the step's forward
        # is queued behind it, and its device time starts only once that kernel is done
        torch.cuda._sleep(200_000_000)
        async for _ in engine.generate([5, 6, 7], params, "r"):
            pass
        engine.close()

    asyncio.run(main())
    [path] = tmp_path.iterdir()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    # 5 rounds (the prompt's step launched, then each round collects the step before it),
    # every one timed; the kernel queued before the first step is not in any step's time
    assert len(lines) == 5 and all("device_s" in r for r in lines)
    total = sum(r["device_s"] for r in lines)
    assert 0 < total < 0.05
    assert engine.stepper.device_seconds == pytest.approx(total, abs=1e-5)

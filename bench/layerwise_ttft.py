"""Time to first token of a disaggregated request, KV sent whole after the prefill or streamed
layer by layer during it, over the gloo channel transport (prefill and decode workers in one
process, as tests/test_kv_layerwise.py wires them; a CPU stand-in for the nccl runs).

TTFT here is from the decode worker's `generate` call to its first output: reserve, prefill,
transfer, admit. The streamed transfer overlaps the prefill's later layers, so the difference
is the share of the transfer that the overlap hides.

    python -m bench.layerwise_ttft [--model DIR] [--tokens 512,1536] [--reps 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time

from decode.worker import DecodeWorker
from engine.async_engine import AsyncEngine
from engine.config import EngineConfig, ModelConfig
from engine.llm_engine import Engine
from engine.sampling_params import SamplingParams
from engine.tiny_model import make_tiny_model
from kvtransfer import make_transport, model_fingerprint
from prefill.worker import PrefillWorker

ONE = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)


async def ttft_ms(decode: DecodeWorker, prompt: list[int], rid: str) -> float:
    start = time.perf_counter()
    async for _ in decode.generate(prompt, ONE, rid):
        return (time.perf_counter() - start) * 1e3
    raise RuntimeError("no output")


def measure(model: str, tokens: int, reps: int, layerwise: bool) -> float:
    cfg = EngineConfig(page_size=16, num_pages=4 * (tokens // 16 + 2),
                       max_num_batched_tokens=max(2048, tokens), enable_prefix_caching=False)
    fp = model_fingerprint(model, "float32", "safetensors", 0)
    send, recv = make_transport("gloo", timeout_s=120), make_transport("gloo", timeout_s=120)
    prefill = PrefillWorker(AsyncEngine(Engine(ModelConfig(model), cfg)), send, fp)
    decode = DecodeWorker(AsyncEngine(Engine(ModelConfig(model), cfg)), prefill, recv, fp,
                          timeout_s=120, layerwise=layerwise)

    async def main() -> list[float]:
        times = []
        for i in range(reps + 1):  # the first pairs the channel: not counted
            prompt = [(i * 7919 + j * 31) % 1990 + 6 for j in range(tokens)]
            times.append(await ttft_ms(decode, prompt, f"r{i}"))
        return times[1:]

    try:
        return statistics.median(asyncio.run(main()))
    finally:
        send.close()
        recv.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="a model directory (default: the tiny Llama)")
    ap.add_argument("--tokens", default="512,1536")
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args(argv)
    model = a.model or str(make_tiny_model(tempfile.mkdtemp() + "/tiny", "llama", 0))
    for tokens in (int(t) for t in a.tokens.split(",")):
        whole = measure(model, tokens, a.reps, layerwise=False)
        streamed = measure(model, tokens, a.reps, layerwise=True)
        print(json.dumps({"prompt_tokens": tokens, "ttft_ms_whole": round(whole, 1),
                          "ttft_ms_layerwise": round(streamed, 1),
                          "layerwise_over_whole": round(streamed / whole, 3)}))


if __name__ == "__main__":
    main()

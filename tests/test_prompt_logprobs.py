"""Prompt logprobs equal HF transformers' log-softmax (fp32, CPU, within 1e-4): through the
engine (chunked prefill, mid-run joins, prefix-cache hits, preemption), and through in-process
prefill + decode workers (inline transport, and gloo channels whole or layer by layer)."""

from __future__ import annotations

import asyncio
import functools
import random

import pytest
import torch

from decode.worker import DecodeWorker
from engine.async_engine import AsyncEngine
from engine.config import EngineConfig, ModelConfig
from engine.llm import LLM
from engine.llm_engine import Engine
from engine.outputs import RequestOutput, TokenLogprob
from engine.sampling_params import SamplingParams
from kvtransfer import make_transport, model_fingerprint
from prefill.worker import PrefillWorker
from tests.hf_reference import hf_model
from tests.test_disaggregated_inprocess import no_pages_left

TOL = 1e-4
PARAMS = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, prompt_logprobs=3)


@functools.lru_cache(maxsize=16)
def _hf_logprobs(path: str, prompt: tuple[int, ...]) -> torch.Tensor:
    """[P - 1, V]: row q is HF's log-softmax at position q, which scores prompt token q + 1."""
    with torch.no_grad():
        logits = hf_model(path)(torch.tensor([prompt])).logits[0].float()  # [P, V]
    return logits.log_softmax(dim=-1)[:-1]


def max_error(path: str, prompt: list[int], got: list[TokenLogprob | None], k: int) -> float:
    """Checks shape, ids and top-k ids; returns the largest |logprob - HF| seen."""
    ref = _hf_logprobs(path, tuple(prompt))
    assert len(got) == len(prompt) and got[0] is None
    worst = 0.0
    for p in range(1, len(prompt)):
        lp, row = got[p], ref[p - 1]
        assert lp is not None and lp.token_id == prompt[p]
        worst = max(worst, abs(lp.logprob - row[prompt[p]].item()))
        ref_top = row.topk(k)
        assert [t for t, _ in lp.top] == ref_top.indices.tolist()  # tiny model: no ties
        worst = max([worst, *(abs(v - r) for (_, v), r in zip(lp.top, ref_top.values.tolist()))])
    return worst


def _prompts(seed: int, lengths: tuple[int, ...]) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(6, 2000) for _ in range(n)] for n in lengths]


def _run(llm: LLM, prompts: list[list[int]], params: SamplingParams, join_after: int = 0,
         ) -> dict[int, list[RequestOutput]]:
    """Outputs per prompt index; the second half joins after `join_after` steps."""
    outs: dict[str, list[RequestOutput]] = {}
    half = (len(prompts) + 1) // 2
    ids = [llm.add_request(p, params) for p in prompts[:half]]
    for _ in range(join_after):
        for o in llm.step():
            outs.setdefault(o.request_id, []).append(o)
    ids += [llm.add_request(p, params) for p in prompts[half:]]
    while llm.engine.has_unfinished():
        for o in llm.step():
            outs.setdefault(o.request_id, []).append(o)
    return {i: outs[rid] for i, rid in enumerate(ids)}


def _prompt_lps(outs: list[RequestOutput]) -> list[TokenLogprob | None]:
    assert outs[0].prompt_logprobs is not None
    assert all(o.prompt_logprobs is None for o in outs[1:])  # on the first output only
    return outs[0].prompt_logprobs


def test_engine_prompt_logprobs_equal_hf_over_chunks_and_joins(tiny_llama):
    llm = LLM(tiny_llama, page_size=16, num_pages=256, max_num_batched_tokens=16)
    prompts = _prompts(1, (1, 2, 7, 16, 17, 40, 129))
    got = _run(llm, prompts, PARAMS, join_after=3)
    worst = max(max_error(tiny_llama, p, _prompt_lps(got[i]), 3) for i, p in enumerate(prompts))
    print(f"engine, chunks of 16: max |logprob - HF| = {worst:.2e}")
    assert worst < TOL
    assert llm.engine.num_pages_used == 0


def test_prefix_cached_positions_are_recomputed_not_skipped(tiny_llama):
    llm = LLM(tiny_llama, page_size=16, num_pages=128, max_num_batched_tokens=64)
    shared = _prompts(2, (80,))[0]
    plain = SamplingParams(max_tokens=1, temperature=0.0)
    llm.generate([shared + [5]], plain)  # caches 5 blocks of the shared prefix
    b = shared + [21, 22]
    rid = llm.add_request(b, PARAMS)
    req = llm.engine.scheduler.requests[rid]
    first = llm.step()
    assert req.num_cached_tokens == 80  # the cache was used: only 2 positions ran in the pool
    out = next(o for o in first if o.request_id == rid)
    assert max_error(tiny_llama, b, _prompt_lps([out]), 3) < TOL
    while llm.engine.has_unfinished():
        llm.step()
    llm.engine.check_integrity()
    assert llm.engine.num_pages_used == 0


def test_preempted_mid_prompt_keeps_and_completes_prompt_logprobs(tiny_llama):
    # 9 pages of 16: two 70-token prompts in chunks of 32 cannot both fit; one is preempted.
    llm = LLM(tiny_llama, page_size=16, num_pages=9, max_num_batched_tokens=32,
              enable_prefix_caching=False)
    prompts = _prompts(3, (70, 70))
    got = _run(llm, prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True,
                                            prompt_logprobs=0))
    assert llm.engine.scheduler.num_preemptions > 0
    for i, p in enumerate(prompts):
        assert max_error(tiny_llama, p, _prompt_lps(got[i]), 0) < TOL
    assert llm.engine.num_pages_used == 0


def test_no_prompt_logprobs_unless_asked(tiny_llama):
    llm = LLM(tiny_llama, num_pages=64)
    got = _run(llm, _prompts(4, (20,)), SamplingParams(max_tokens=2, temperature=0.0))
    assert all(o.prompt_logprobs is None for o in got[0])
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=21)


# -- disaggregated: computed on the prefill replica, carried back with the first token ----------
def _engine(path: str) -> AsyncEngine:
    return AsyncEngine(Engine(ModelConfig(path), EngineConfig(page_size=16, num_pages=128,
                                                              max_num_batched_tokens=32)))


async def _generate(decode: DecodeWorker, prompts: list[list[int]]) -> list[list[RequestOutput]]:
    async def one(i: int, p: list[int]) -> list[RequestOutput]:
        return [o async for o in decode.generate(p, PARAMS, f"r{i}")]

    return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))


@pytest.mark.parametrize("transport", ["inline", "gloo-whole", "gloo-layerwise", "inline-local"])
def test_disaggregated_prompt_logprobs_equal_hf(tiny_llama, transport):
    """inline-local: the decode replica prefills the third prompt itself (64 of its 66 tokens
    cached there: `local_prefill_max_tokens`), so it computes those prompt logprobs."""
    fp = model_fingerprint(tiny_llama, "float32", "safetensors", 0)
    if transport.startswith("inline"):
        send = recv = make_transport("inline")
    else:
        send, recv = make_transport("gloo", timeout_s=60), make_transport("gloo", timeout_s=60)
    prefill = PrefillWorker(_engine(tiny_llama), send, fp)
    decode = DecodeWorker(_engine(tiny_llama), prefill, recv, fp, timeout_s=60,
                          layerwise=transport == "gloo-layerwise",
                          local_prefill_max_tokens=8 if transport == "inline-local" else 0)
    shared = _prompts(5, (64,))[0]
    # The second prompt's 4 shared blocks are cached on both sides when it runs.
    prompts = [shared + [7, 8, 9], _prompts(6, (45,))[0]]

    async def main() -> list[list[RequestOutput]]:
        first = await _generate(decode, prompts)
        return first + await _generate(decode, [shared + [10, 11]])

    try:
        got = asyncio.run(main())
    finally:
        if not transport.startswith("inline"):
            send.close()
            recv.close()
    prompts.append(shared + [10, 11])
    worst = max(max_error(tiny_llama, p, _prompt_lps(outs), 3) for p, outs in zip(prompts, got))
    print(f"disaggregated ({transport}): max |logprob - HF| = {worst:.2e}")
    assert worst < TOL
    ref = LLM(tiny_llama, num_pages=128).generate(prompts, PARAMS)
    assert [[t for o in outs for t in o.new_token_ids] for outs in got] == \
        [c.token_ids for c in ref]
    local = 1 if transport == "inline-local" else 0
    assert decode.metrics.counters.get("pdserve_local_prefills_total", 0) == local
    no_pages_left(prefill, decode)

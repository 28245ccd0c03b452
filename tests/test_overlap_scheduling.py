"""Overlapped scheduling: step N+1 is planned and launched before step N's tokens are back.

On CPU the kernels run synchronously, so nothing is faster here, but the bookkeeping is the same
as on the GPU: counters move at launch, sampled ids reach the next step as placeholders, and the
outputs of a step come back on the next call of `step`. Every test compares with the same engine
without overlap, token for token.
"""

from __future__ import annotations

import random

import pytest

from engine.config import EngineConfig
from engine.llm import LLM
from engine.sampling_params import SamplingParams


def _prompts(seed: int, lengths: tuple[int, ...]) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(6, 2000) for _ in range(n)] for n in lengths]


def _pair(path: str, **kwargs) -> tuple[LLM, LLM]:
    return (LLM(path, overlap_scheduling="off", **kwargs),
            LLM(path, overlap_scheduling="on", **kwargs))


def _run(llm: LLM, prompts, params) -> list[tuple[list[int], str | None]]:
    out = llm.generate(prompts, params)
    llm.engine.check_integrity()
    assert llm.engine.num_pages_used == 0
    assert not llm.engine.has_unfinished()
    return [(c.token_ids, c.finish_reason) for c in out]


def test_outputs_come_one_call_later(tiny_llama):
    llm = LLM(tiny_llama, num_pages=64, overlap_scheduling="on")
    rid = llm.add_request([5, 6, 7, 8], SamplingParams(max_tokens=3, temperature=0,
                                                       ignore_eos=True))
    req = llm.engine.scheduler.requests[rid]
    assert llm.step() == []  # the prompt step is launched, not yet back
    # It already counts: 4 prompt tokens computed, the first output a placeholder.
    assert (req.num_computed_tokens, req.num_output_placeholders) == (4, 1)
    assert req.output_token_ids == []
    first = llm.step()  # launches the next step, then returns the first token
    assert [o.num_output_tokens for o in first] == [1]
    assert (req.num_computed_tokens, req.num_output_placeholders) == (5, 1)
    assert [o.num_output_tokens for o in llm.step()] == [2]
    # The third token is on the way and ends the request by length: nothing more is launched.
    assert req.num_computed_tokens == 6
    last = llm.step()
    assert [(o.num_output_tokens, o.finish_reason) for o in last] == [(3, "length")]
    assert not llm.engine.has_unfinished()
    ref = LLM(tiny_llama, num_pages=64).generate([[5, 6, 7, 8]], SamplingParams(
        max_tokens=3, temperature=0, ignore_eos=True))[0]
    assert req.output_token_ids == ref.token_ids


def test_seeded_sampling_and_logprobs_are_unchanged(tiny_llama):
    off, on = _pair(tiny_llama, num_pages=128, max_num_batched_tokens=32)
    prompts = _prompts(1, (5, 40, 17, 3))
    params = [SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=s, logprobs=2,
                             ignore_eos=True) for s in range(4)]
    a, b = off.generate(prompts, params), on.generate(prompts, params)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert [c.logprobs for c in a] == [c.logprobs for c in b]


def test_repetition_penalty_waits_for_the_pending_token(tiny_llama):
    off, on = _pair(tiny_llama, num_pages=128)
    prompts = _prompts(2, (9, 30))
    params = [SamplingParams(max_tokens=15, temperature=0, repetition_penalty=1.3,
                             ignore_eos=True),
              SamplingParams(max_tokens=15, temperature=0, ignore_eos=True)]
    assert _run(off, prompts, params) == _run(on, prompts, params)


def test_stop_token_met_while_the_next_step_runs(tiny_llama):
    prompt = _prompts(3, (12,))[0]
    free = LLM(tiny_llama, num_pages=64).generate(
        [prompt], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0].token_ids
    stop_at = free[4]  # the 5th token ends the request; its step's successor is discarded
    params = SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[stop_at],
                            ignore_eos=True)
    off, on = _pair(tiny_llama, num_pages=64)
    want = [(free[:free.index(stop_at) + 1], "stop")]
    assert _run(off, [prompt], params) == want
    assert _run(on, [prompt], params) == want


def test_preempted_while_its_step_runs(tiny_llama):
    """A pool of 12 pages for 5 requests: requests are preempted with a step in flight."""
    prompts = _prompts(4, (30, 45, 20, 50, 35))
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    off, on = _pair(tiny_llama, page_size=8, num_pages=16, enable_prefix_caching=False)
    on_pages = LLM(tiny_llama, page_size=8, num_pages=16, enable_prefix_caching=True,
                   overlap_scheduling="on")
    want = _run(off, prompts, params)
    assert _run(on, prompts, params) == want
    assert _run(on_pages, prompts, params) == want
    assert on.engine.scheduler.num_preemptions > 0
    assert on_pages.engine.scheduler.num_preemptions > 0


def test_abort_with_a_step_in_flight_frees_the_pages(tiny_llama):
    llm = LLM(tiny_llama, page_size=8, num_pages=32, overlap_scheduling="on")
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    keep, gone = (llm.add_request(p, params) for p in _prompts(5, (20, 25)))
    for _ in range(4):
        llm.step()
    assert llm.engine.scheduler.requests[gone].num_output_placeholders == 1
    assert llm.abort(gone)
    llm.engine.check_integrity()
    outs = []
    while llm.engine.has_unfinished():
        outs += llm.step()
    assert {o.request_id for o in outs} == {keep}  # the aborted request's tokens are dropped
    assert llm.engine.num_pages_used == 0
    llm.engine.check_integrity()


def test_prefix_cache_fills_only_with_known_tokens(tiny_llama):
    """Blocks are hashed at update, once their tokens are back: a second request sharing the
    first one's prompt + output finds the same cached blocks with and without overlap."""
    prompt = _prompts(6, (40,))[0]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    for llm in _pair(tiny_llama, page_size=8, num_pages=64):
        first = llm.generate([prompt], params)[0].token_ids
        rid = llm.add_request(prompt + first, SamplingParams(max_tokens=2, temperature=0))
        req = llm.engine.scheduler.requests[rid]
        while llm.engine.has_unfinished():
            llm.step()
        # The first request wrote KV for 63 tokens (its last output never ran): 7 full blocks,
        # 2 of them past its prompt, all found by the second (which may take (64 - 1) // 8).
        assert req.num_cached_tokens == 56
        llm.engine.check_integrity()


def test_overlap_setting_is_checked(tiny_llama):
    with pytest.raises(ValueError, match="overlap_scheduling must be one of auto, off, on"):
        LLM(tiny_llama, overlap_scheduling="yes")
    # a bool is the mode of that name (YAML reads a bare on / off as true / false)
    assert EngineConfig(overlap_scheduling=True).overlap_scheduling == "on"
    assert EngineConfig(overlap_scheduling=False).overlap_scheduling == "off"

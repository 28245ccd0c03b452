"""The scheduler as a spec: token splits and page ids, step by step, without a model or torch.

Pages are handed out from the free list in order (0, 1, 2, ...) and come back to its end in
reverse (a request's tail first), so every page id below is determined by the steps before it.
"""

from __future__ import annotations

import subprocess
import sys
from collections import deque

import pytest

from engine.batch import ModelOutput
from engine.block_allocator import BlockAllocator
from engine.block_hash import block_hashes
from engine.config import EngineConfig
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.scheduler import Reservation, Scheduler

PS = 4  # tokens per page


def scheduler(num_pages: int, budget: int = 16, max_num_seqs: int = 8,
              prefix_caching: bool = False) -> Scheduler:
    cfg = EngineConfig(page_size=PS, num_pages=num_pages, max_num_batched_tokens=budget,
                       max_num_seqs=max_num_seqs, enable_prefix_caching=prefix_caching)
    return Scheduler(cfg, BlockAllocator(num_pages, PS), max_model_len=64)


def request(rid: str, prompt: list[int], max_tokens: int = 8, **kw) -> Request:
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), **kw)


def step(sched: Scheduler, token: int = 7) -> list[tuple[str, int, list[int]]]:
    """One step with a model that samples `token` wherever a request reaches its last token.
    Returns (request id, tokens run, pages after the step) per scheduled request."""
    batch = sched.schedule()
    toks = [token if r.num_computed_tokens + n == r.num_tokens else None
            for r, n in zip(batch.requests, batch.num_new_tokens)]
    split = [(r.request_id, n, list(r.block_table))
             for r, n in zip(batch.requests, batch.num_new_tokens)]
    sched.update(batch, ModelOutput(toks))
    sched.check_integrity()
    return split


def free_list(sched: Scheduler) -> list[int]:
    return list(sched.kv.allocator.free_pages)


def test_chunked_prefill_then_decode_then_pages_back():
    sched = scheduler(num_pages=8, budget=6)
    a = request("a", list(range(10)), max_tokens=3)
    sched.add(a)
    assert step(sched, 100) == [("a", 6, [0, 1])]  # first chunk: no token sampled
    assert a.num_computed_tokens == 6 and a.output_token_ids == []
    assert step(sched, 100) == [("a", 4, [0, 1, 2])]  # rest of the prompt: samples 100
    assert step(sched, 101) == [("a", 1, [0, 1, 2])]  # token 11 still fits page 2
    assert step(sched, 102) == [("a", 1, [0, 1, 2])]
    assert a.output_token_ids == [100, 101, 102] and a.finish_reason == "length"
    assert not sched.has_unfinished() and sched.requests == {}
    assert a.block_table == [] and sched.kv.num_used == 0
    assert free_list(sched) == [3, 4, 5, 6, 7, 2, 1, 0]


def test_launch_counts_prompt_tokens_prompt_steps_and_decode_rows():
    sched = scheduler(num_pages=16, budget=6)
    a, b = request("a", list(range(10)), max_tokens=3), request("b", list(range(3)), max_tokens=2)
    sched.add(a)
    assert step(sched) == [("a", 6, [0, 1])]
    sched.add(b)
    assert step(sched) == [("a", 4, [0, 1, 2]), ("b", 2, [3])]  # b's prompt: a chunk of 2
    assert step(sched) == [("a", 1, [0, 1, 2]), ("b", 1, [3])]  # b's last prompt token
    assert step(sched) == [("a", 1, [0, 1, 2]), ("b", 1, [3])]  # both decode
    assert (sched.num_prefill_tokens, sched.num_prefill_steps, sched.num_decode_tokens) == (
        6 + 4 + 2 + 1, 3, 1 + 2)


def test_decodes_go_first_and_a_prefill_chunk_fills_the_budget():
    sched = scheduler(num_pages=8, budget=6)
    a, b = request("a", [1] * 5), request("b", [2] * 7)
    sched.add(a)
    sched.add(b)
    assert step(sched) == [("a", 5, [0, 1]), ("b", 1, [2])]
    assert step(sched) == [("a", 1, [0, 1]), ("b", 5, [2, 3])]
    assert step(sched) == [("a", 1, [0, 1]), ("b", 1, [2, 3])]
    assert (len(a.output_token_ids), len(b.output_token_ids)) == (3, 1)


def test_max_num_seqs_holds_new_requests_back():
    sched = scheduler(num_pages=8, max_num_seqs=1)
    sched.add(request("a", [1] * 3, max_tokens=1))
    sched.add(request("b", [2] * 3, max_tokens=1))
    assert step(sched) == [("a", 3, [0])]
    assert step(sched) == [("b", 3, [1])]


def test_preemption_frees_the_latest_request_and_recomputes_it_later():
    sched = scheduler(num_pages=4)
    a, b = request("a", [1] * 7, max_tokens=3), request("b", [2] * 7, max_tokens=4)
    sched.add(a)
    sched.add(b)
    assert step(sched, 50) == [("a", 7, [0, 1]), ("b", 7, [2, 3])]
    assert step(sched, 51) == [("a", 1, [0, 1]), ("b", 1, [2, 3])]  # token 8 fits page 1
    # a needs a third page for its 9th token: b (last in) gives its pages back, tail first.
    assert step(sched, 52) == [("a", 1, [0, 1, 3])]
    assert (b.num_preemptions, b.num_computed_tokens, b.block_table) == (1, 0, [])
    assert b.output_token_ids == [50, 51]  # kept: recomputed, not resampled
    assert a.finish_reason == "length" and sched.num_preemptions == 1
    # b recomputes prompt + outputs (9 tokens) in the pages that came back: 2, then a's 3, 1.
    assert step(sched, 53) == [("b", 9, [2, 3, 1])]
    assert step(sched, 54) == [("b", 1, [2, 3, 1])]
    assert b.output_token_ids == [50, 51, 53, 54] and b.finish_reason == "length"
    assert sched.kv.num_used == 0


def test_abort_frees_pages_wherever_the_request_is():
    sched = scheduler(num_pages=8, budget=4)
    a, b = request("a", [1] * 6), request("b", [2] * 6)
    sched.add(a)
    sched.add(b)
    assert step(sched) == [("a", 4, [0])]
    assert sched.abort("a") is a  # running
    assert (a.finish_reason, a.block_table, a.num_computed_tokens) == ("abort", [], 0)
    assert sched.abort("b") is b  # waiting
    assert sched.abort("b") is None and sched.abort("never-seen") is None
    assert not sched.has_unfinished() and sched.kv.num_used == 0
    sched.check_integrity()


def test_prefix_cache_shares_full_blocks_and_runs_at_least_one_token():
    sched = scheduler(num_pages=8, prefix_caching=True)
    shared = [9, 8, 7, 6, 5, 4, 3, 2]  # two full blocks
    sched.add(request("a", shared + [1], max_tokens=1))
    assert step(sched) == [("a", 9, [0, 1, 2])]
    # Same two blocks: only the last token runs. A prompt of exactly the two blocks still
    # runs its last block's last token, so it takes one cached page only.
    b, c = request("b", shared + [5, 5], max_tokens=1), request("c", shared, max_tokens=1)
    sched.add(b)
    sched.add(c)
    assert step(sched) == [("b", 2, [0, 1, 3]), ("c", 4, [0, 4])]
    assert (b.num_cached_tokens, c.num_cached_tokens) == (8, 4)
    # c recomputed block 1 into page 4, but that hash stays with page 1: 4 goes back as free.
    assert sched.kv.num_used == 0 and sched.kv.num_cached == 2
    assert free_list(sched) == [5, 6, 7, 2, 3, 4]


def test_pd_import_reserves_missing_pages_then_joins_the_batch():
    sched = scheduler(num_pages=6, prefix_caching=True)
    x = request("x", list(range(9)), max_tokens=2)
    assert sched.reserve(x) == Reservation(0, 3, x.block_hashes)
    assert len(x.block_hashes) == 2 and x.block_table == [0, 1, 2]
    assert not sched.has_unfinished()  # reserved requests are not stepped
    sched.import_done(x, first_block=0)  # the caller wrote pages 0, 1, 2
    sched.admit(x, first_token=40)
    assert x.num_computed_tokens == 9 and x.output_token_ids == [40]
    assert step(sched, 41) == [("x", 1, [0, 1, 2])]  # decodes token 40 at position 9
    assert x.finish_reason == "length" and sched.kv.num_used == 0

    # Same first two blocks: only one page crosses; an abort before the KV arrives frees it.
    y = request("y", list(range(8)) + [99], max_tokens=2)
    assert sched.reserve(y) == Reservation(2, 1, y.block_hashes)
    assert y.block_table == [0, 1, 3] and y.num_cached_tokens == 8
    assert sched.abort("y") is y
    assert sched.kv.num_used == 0 and sched.requests == {}
    sched.check_integrity()


def test_reserve_keeps_nothing_when_the_pool_is_full():
    sched = scheduler(num_pages=2, prefix_caching=True)
    assert sched.reserve(request("big", list(range(9)))) is None
    assert sched.kv.num_used == 0 and sched.requests == {} and sched.reserved == {}
    sched.add(request("dup", [1]))
    with pytest.raises(ValueError, match="already running"):
        sched.reserve(request("dup", [1]))
    assert sched.abort("dup") is not None
    sched.check_integrity()


def test_export_keeps_pages_until_released():
    sched = scheduler(num_pages=8)
    p = request("p", list(range(9)), max_tokens=1, kv_export_from=1)
    sched.add(p)
    assert step(sched) == [("p", 9, [0, 1, 2])]
    assert p.finish_reason == "length" and sched.exporting == {"p": p}
    assert sched.kv.num_used == 3  # still readable by the exporter
    sched.release(p)
    assert sched.kv.num_used == 0 and sched.requests == {} and sched.exporting == {}
    q = request("q", list(range(5)), max_tokens=1, kv_export_from=0)
    sched.add(q)
    step(sched)
    assert sched.abort("q") is q  # a caller that gave up: pages back without an export
    assert sched.kv.num_used == 0
    sched.check_integrity()


def test_integrity_check_catches_a_page_no_request_holds():
    sched = scheduler(num_pages=4)
    sched.add(request("a", [1] * 5))
    step(sched)
    sched.kv.allocator.allocate(1)  # a leak: taken behind the scheduler's back
    with pytest.raises(AssertionError, match="refcount 1 but 0 live requests"):
        sched.check_integrity()


def test_scheduler_imports_no_torch():
    code = ("import sys, engine.scheduler, engine.kv_manager; "
            "assert 'torch' not in sys.modules and 'numpy' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_burst_on_one_new_prefix_computes_it_once():
    """Two prompts on the same two new blocks come together: the second waits while the first
    computes them (the queue behind it goes on), then finds them cached and shares their
    pages, computing only its own tokens."""
    sched = scheduler(num_pages=12, budget=48, prefix_caching=True)
    shared = list(range(2 * PS))
    a = request("a", shared + [90, 91])
    b = request("b", shared + [80, 81, 82])
    c = request("c", [50] * 5)  # shares nothing: not held up behind b
    for r in (a, b, c):
        sched.add(r)
    assert step(sched) == [("a", 10, [0, 1, 2]), ("c", 5, [3, 4])]
    assert sched.kv.computing == {} and sched.kv.claims == {}  # a's blocks are cached now
    # b finds a's two pages cached and computes its 3 tokens; a and c decode.
    assert step(sched) == [("a", 1, [0, 1, 2]), ("c", 1, [3, 4]), ("b", 3, [0, 1, 5])]
    assert b.num_cached_tokens == 2 * PS


def test_a_prompt_waits_for_blocks_computed_in_chunks_until_the_shared_part_is_cached():
    sched = scheduler(num_pages=12, budget=PS, prefix_caching=True)
    shared = list(range(2 * PS))
    a = request("a", shared + [90])
    b = request("b", shared + [80])
    sched.add(a)
    sched.add(b)
    assert step(sched) == [("a", 4, [0])]  # block 0; b waits for it
    assert sched.kv.claims == {"a": deque([block_hashes(a.prompt_token_ids, PS)[1]])}
    assert step(sched) == [("a", 4, [0, 1])]  # block 1; b waits for that one too
    assert step(sched) == [("a", 1, [0, 1, 2]), ("b", 1, [0, 1, 3])]
    assert b.num_cached_tokens == 2 * PS and sched.kv.claims == {}


def test_a_prompt_waiting_for_a_claimed_block_takes_no_pages_meanwhile():
    """While b waits for a's blocks it looks the prefix cache up without taking references (no
    take-and-give-back of cached pages each step); it shares the pages once it runs."""
    sched = scheduler(num_pages=12, budget=48, prefix_caching=True)
    shared = list(range(2 * PS))
    for rid, tail in (("a", [90, 91]), ("b", [80, 81, 82]), ("c", [70])):
        sched.add(request(rid, shared + tail))
    matched = []
    match = sched.kv.match_prefix
    sched.kv.match_prefix = lambda req, max_blocks: matched.append(req.request_id) or match(
        req, max_blocks)
    assert step(sched) == [("a", 10, [0, 1, 2])]  # b and c wait for a's two blocks
    assert matched == ["a"]
    assert step(sched) == [("a", 1, [0, 1, 2]), ("b", 3, [0, 1, 3]), ("c", 1, [0, 1, 4])]
    assert matched == ["a", "b", "c"]


def test_an_aborted_leader_no_longer_holds_others_back():
    sched = scheduler(num_pages=12, budget=PS, prefix_caching=True)
    shared = list(range(2 * PS))
    sched.add(request("a", shared + [90]))
    b = request("b", shared + [80])
    sched.add(b)
    assert step(sched) == [("a", 4, [0])]
    sched.abort("a")
    assert sched.kv.claims == {} and sched.kv.computing == {}
    # b finds block 0 cached (a computed it) and computes block 1 itself.
    assert step(sched) == [("b", 4, [0, 1])]
    assert b.num_cached_tokens == PS


def test_a_preempted_leader_claims_again_when_it_resumes():
    sched = scheduler(num_pages=12, budget=PS, prefix_caching=True)
    shared = list(range(2 * PS))
    a = request("a", shared + [90])
    sched.add(a)
    sched.add(request("b", shared + [80]))
    assert step(sched) == [("a", 4, [0])]
    sched._preempt(a)  # as a full pool would
    assert sched.kv.claims == {}
    # a comes back first (preempted requests go to the queue's head), finds block 0 cached
    # and claims block 1 again; b still waits for it.
    assert step(sched) == [("a", 4, [0, 1])]
    assert list(sched.waiting) == [sched.requests["b"]]


def test_without_a_prefix_cache_nobody_waits():
    sched = scheduler(num_pages=12, budget=48)
    shared = list(range(2 * PS))
    sched.add(request("a", shared + [90]))
    sched.add(request("b", shared + [80]))
    assert step(sched) == [("a", 9, [0, 1, 2]), ("b", 9, [3, 4, 5])]

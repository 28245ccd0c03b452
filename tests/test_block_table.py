"""BlockTableMirror: rows equal the requests' block_table lists through every way they change."""

from __future__ import annotations

import random

import numpy as np

from engine.batch import ModelOutput
from engine.block_allocator import BlockAllocator
from engine.block_table import BlockTableMirror, PageRows
from engine.config import EngineConfig
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler


def _req(name: str, pages: list[int]) -> Request:
    req = Request(name, [1, 2, 3], SamplingParams())
    req.block_table = pages
    return req


def _lists(rows: PageRows) -> list[list[int]]:
    return [rows.table[r, :n].tolist() for r, n in zip(rows.rows.tolist(), rows.lens.tolist())]


def _check(mirror: BlockTableMirror, reqs: list[Request]) -> PageRows:
    rows = mirror.sync(reqs)
    assert rows.table.dtype == np.int32
    assert _lists(rows) == [r.block_table for r in reqs]
    assert len(set(rows.rows.tolist())) == len(reqs)  # one row per request
    return rows


def test_append_in_place_copies_only_new_pages():
    mirror = BlockTableMirror(num_rows=2, width=4)
    a = _req("a", [5, 6])
    _check(mirror, [a])
    a.block_table += [7, 8, 9]  # in place, past the initial width: the array widens
    rows = _check(mirror, [a])
    assert rows.table.shape[1] >= 5
    # Pages already mirrored are not read again (the contract: nobody rewrites them in place).
    a.block_table[0] = 99
    a.block_table += [10]
    assert _lists(mirror.sync([a])) == [[5, 6, 7, 8, 9, 10]]


def test_new_list_after_preemption_and_shorter_list_resync():
    mirror = BlockTableMirror(num_rows=2, width=4)
    a = _req("a", [1, 2, 3])
    _check(mirror, [a])
    a.block_table = []  # preempted: a new empty list
    _check(mirror, [a])
    a.block_table = [7, 8, 9, 10]  # recomputed on other pages, longer than before
    _check(mirror, [a])
    a.block_table = [4, 5, 6, 11, 12]  # a new list of the same length or more is recopied
    _check(mirror, [a])
    del a.block_table[1:]  # the same object got shorter
    a.block_table += [13]
    _check(mirror, [a])


def test_leaving_request_frees_its_row_for_a_new_one():
    mirror = BlockTableMirror(num_rows=2, width=8)
    a, b = _req("a", [1, 2, 3, 4, 5, 6]), _req("b", [7])
    rows = _check(mirror, [a, b])
    row_a = rows.rows[0]
    c = _req("c", [20, 21])  # a left: c takes its row, which still holds a's old pages
    rows = _check(mirror, [b, c])
    assert rows.rows[1] == row_a and mirror.num_rows_used == 2
    d = _req("d", [])  # an empty table on a reused row
    rows = _check(mirror, [d, b])
    assert rows.lens[0] == 0
    # a comes back (e.g. it was skipped for one step): copied from scratch on some free row
    _check(mirror, [a, d])
    assert mirror.table.shape[0] == 2  # never more rows than the largest step needed
    _check(mirror, [])
    assert mirror.num_rows_used == 0


def test_rows_grow_and_stay_bounded_under_churn():
    rng = random.Random(0)
    mirror = BlockTableMirror(num_rows=1, width=1)
    live: list[Request] = []
    largest = 0
    for step in range(200):
        live = [r for r in live if rng.random() < 0.8]
        live += [_req(f"{step}-{i}", [rng.randrange(1000) for _ in range(rng.randrange(30))])
                 for i in range(rng.randrange(5))]
        for r in live:
            if rng.random() < 0.3:
                r.block_table += [rng.randrange(1000) for _ in range(rng.randrange(4))]
            elif rng.random() < 0.05:
                r.block_table = [rng.randrange(1000) for _ in range(rng.randrange(10))]
        rng.shuffle(live)
        step_reqs = [r for r in live if rng.random() < 0.9]  # some skip a step
        largest = max(largest, len(step_reqs))
        _check(mirror, step_reqs)
        assert mirror.num_rows_used == len(step_reqs)
        assert mirror.table.shape[0] <= 2 * max(largest, 1)


def test_matches_the_real_scheduler_with_preemption_and_prefix_cache():
    """Drive the real scheduler (in-place growth, release, preemption, prefix matching)."""
    rng = random.Random(1)
    ps = 4
    cfg = EngineConfig(page_size=ps, num_pages=40, max_num_seqs=6, max_num_batched_tokens=24)
    sched = Scheduler(cfg, BlockAllocator(40, ps), max_model_len=200)
    prefix = [rng.randrange(50) for _ in range(10)]
    reqs = []
    for i in range(14):
        prompt = (prefix if i % 2 else []) + [rng.randrange(50) for _ in range(rng.randint(1, 30))]
        reqs.append(Request(f"r{i}", prompt, SamplingParams(max_tokens=rng.randint(1, 25))))
        sched.add(reqs[-1])
    mirror = BlockTableMirror(num_rows=1, width=1)
    steps = 0
    while sched.has_unfinished():
        batch = sched.schedule()
        _check(mirror, batch.requests)
        toks = [rng.randrange(50) if r.num_computed_tokens + n == r.num_tokens else None
                for r, n in zip(batch.requests, batch.num_new_tokens)]
        sched.update(batch, ModelOutput(toks))
        steps += 1
        # A livelock guard, not a speed bound: the run is seeded, so its step count is fixed.
        assert steps < 2000
    assert sched.num_preemptions > 0  # the resync-after-preemption path ran
    assert any(r.num_cached_tokens for r in reqs)  # so did prefix matching
    assert sched.kv.num_used == 0
    sched.check_integrity()
    assert mirror.table.shape[0] <= 2 * cfg.max_num_seqs

"""The scheduler under random traffic, against a model of the KV pool that records which token
each step wrote into each page slot.

Every operation a serving replica makes is drawn at random: prompts on a few shared prefixes
(the prefix cache, and the claims of a burst on one new prefix), chunked prefill in a small
budget, a pool small enough to preempt, KV imports (reserve, import, admit) with some aborted
before their KV lands, exports kept until released, aborts anywhere, stop tokens; with and
without overlapped scheduling (the next step planned and launched before the last one is back).

What must hold, after every operation and at the end:
- `check_integrity()` (page refcounts, claims);
- every step reads, in the pages of each request it runs, exactly that request's tokens at every
  position before the ones it computes, and an import or an export finds the prompt's tokens
  in place: no page is shared, reused or evicted under a request that still reads it;
- each request's output is the tokens the model sampled for it, in order, none lost or doubled
  across preemptions; it ended by length at `max_tokens`, by its stop token, or by abort;
- once the traffic stops, every request ends and every page comes back.
"""

from __future__ import annotations

import random
import zlib

import pytest

from engine.batch import ModelOutput, ScheduledBatch
from engine.block_allocator import BlockAllocator
from engine.config import EngineConfig
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler

PS = 4  # tokens per page
STOP = 13  # the stop token of the requests that have one


def sampled(req: Request, index: int) -> int:
    """The fake model's token for output `index` of `req`: fixed per request and index, so a
    lost, doubled or misattributed token shows in the output."""
    return 10 + zlib.crc32(f"{req.request_id}:{index}".encode()) % 20


class Pages:
    """What each (page, slot) holds: a token id, or (request, output index) for a token whose
    id was not back yet when the step that wrote it was launched."""

    def __init__(self) -> None:
        self.slots: dict[tuple[int, int], object] = {}

    def token(self, page: int, slot: int) -> object:
        value = self.slots.get((page, slot))
        if isinstance(value, tuple):
            req, index = value
            if index < len(req.output_token_ids):
                return req.output_token_ids[index]
        return value

    def write(self, req: Request, start: int, end: int) -> None:
        for p in range(start, end):
            value = (req.all_token_ids[p] if p < req.num_tokens
                     else (req, p - req.num_prompt_tokens))
            self.slots[(req.block_table[p // PS], p % PS)] = value

    def check(self, req: Request, end: int) -> None:
        """Positions [0, end) of req's pages hold req's tokens (those known by now)."""
        for p in range(min(end, req.num_tokens)):
            got = self.token(req.block_table[p // PS], p % PS)
            assert got == req.all_token_ids[p], (
                f"{req.request_id} position {p}: page {req.block_table[p // PS]} holds {got!r}, "
                f"not {req.all_token_ids[p]}")


class Traffic:
    def __init__(self, seed: int, overlap: bool) -> None:
        self.rng = random.Random(seed)
        self.overlap = overlap
        cfg = EngineConfig(page_size=PS, num_pages=12, max_num_batched_tokens=12,
                           max_num_seqs=6, enable_prefix_caching=True)
        self.sched = Scheduler(cfg, BlockAllocator(cfg.num_pages, PS), max_model_len=48)
        self.pages = Pages()
        self.prefixes = [[self.rng.randrange(100, 200) for _ in range(n)] for n in (4, 8, 9)]
        self.all: list[Request] = []
        self.in_flight: ScheduledBatch | None = None
        self.n = 0
        self.saw_claims = False  # a step left blocks claimed with another request waiting

    # -- requests ------------------------------------------------------------------------
    def new_request(self, export: bool = False) -> Request:
        self.n += 1
        prefix = self.rng.choice([[], *self.prefixes])
        prompt = prefix + [self.rng.randrange(200, 300) for _ in range(self.rng.randint(1, 9))]
        params = SamplingParams(max_tokens=1 if export else self.rng.randint(1, 6),
                                ignore_eos=True,
                                stop_token_ids=[STOP] if self.rng.random() < 0.3 else [])
        req = Request(f"r{self.n}", prompt, params, kv_export_from=0 if export else None)
        self.all.append(req)
        return req

    def reserve(self) -> None:
        req = self.new_request()
        rsv = self.sched.reserve(req)
        if rsv is None:
            self.all.remove(req)
            assert req.block_table == [] and req.request_id not in self.sched.requests

    def land_import(self) -> None:
        """The oldest reservation's KV arrives (or, one time in four, its client left)."""
        req = next(iter(self.sched.reserved.values()))
        if self.rng.random() < 0.25:
            self.sched.abort(req.request_id)
            return
        first_block = req.num_cached_tokens // PS
        self.pages.check(req, first_block * PS)  # the cached prefix pages hold the prompt
        self.pages.write(req, first_block * PS, req.num_prompt_tokens)
        self.sched.import_done(req, first_block)
        self.sched.admit(req, sampled(req, 0))

    # -- steps ---------------------------------------------------------------------------
    def step(self) -> None:
        """As Engine.step: plan, launch, then take the tokens of the step launched before."""
        batch = self.sched.schedule()
        assert batch.num_tokens <= self.sched.cfg.max_num_batched_tokens
        for req, n in zip(batch.requests, batch.num_new_tokens):
            self.pages.check(req, req.num_computed_tokens)  # what the step attends to
            self.pages.write(req, req.num_computed_tokens, req.num_computed_tokens + n)
        if batch.requests:
            self.sched.launch(batch)
        self.saw_claims |= bool(self.sched.kv.computing and self.sched.waiting)
        if not self.overlap:
            self.finish(batch)
            return
        previous, self.in_flight = self.in_flight, batch if batch.requests else None
        if previous is not None:
            self.finish(previous)

    def finish(self, batch: ScheduledBatch) -> None:
        if not batch.launched:
            return
        toks = []
        for req, samples in zip(batch.requests, batch.samples):
            toks.append(sampled(req, len(req.output_token_ids)) if samples else None)
        self.sched.update(batch, ModelOutput(toks))
        for req in list(self.sched.exporting.values()):
            self.pages.check(req, req.num_prompt_tokens)  # what the export reads
            if self.rng.random() < 0.5:
                self.sched.release(req)

    def abort_one(self) -> None:
        live = [r for r in self.all if not r.finished and r.request_id in self.sched.requests]
        if live:
            self.sched.abort(self.rng.choice(live).request_id)

    def act(self) -> None:
        x = self.rng.random()
        if x < 0.25:
            self.sched.add(self.new_request(export=self.rng.random() < 0.2))
        elif x < 0.35:
            self.reserve()
        elif x < 0.45 and self.sched.reserved:
            self.land_import()
        elif x < 0.5:
            self.abort_one()
        else:
            self.step()
        self.sched.check_integrity()

    def drain(self) -> None:
        while self.sched.reserved:
            self.land_import()
        for _ in range(10_000):  # a hang guard: the schedule is deterministic, not timed
            if not self.sched.has_unfinished() and self.in_flight is None:
                break
            self.step()
            self.sched.check_integrity()
        else:
            raise AssertionError("requests never finished")
        for req in list(self.sched.exporting.values()):
            self.sched.release(req)


@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlap"])
@pytest.mark.parametrize("seed", range(12))
def test_random_traffic_keeps_pages_tokens_and_claims_sound(seed: int, overlap: bool) -> None:
    t = Traffic(seed, overlap)
    for _ in range(400):
        t.act()
    t.drain()
    sched = t.sched
    assert sched.requests == {} and sched.kv.num_used == 0
    assert sched.kv.claims == {} and sched.kv.computing == {}
    sched.check_integrity()
    for req in t.all:
        out = req.output_token_ids
        assert out == [sampled(req, i) for i in range(len(out))], req.request_id
        if req.finish_reason == "length":
            assert len(out) == req.params.max_tokens or req.num_tokens >= sched.max_model_len
        elif req.finish_reason == "stop":
            assert out[-1] == STOP and STOP not in out[:-1]
        else:
            assert req.finish_reason == "abort", (req.request_id, req.finish_reason)
    # The traffic did what it is for: shared prefixes, preemptions, waits, imports, aborts.
    reasons = {r.finish_reason for r in t.all}
    assert {"length", "abort"} <= reasons
    assert sched.num_preemptions > 0 and any(r.num_cached_tokens for r in t.all)
    assert t.saw_claims

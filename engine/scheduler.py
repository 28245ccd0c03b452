"""Iteration-level scheduler: which requests run how many tokens in the next step, and the one
owner of every request's KV pages (through its KVManager).

Each step mixes decode tokens and prefill chunks under `max_num_batched_tokens` and
`max_num_seqs`. Requests can join between any two steps; finished ones leave at once. When the
pool runs out, the latest-arrived running request is preempted: its pages are freed and it is
recomputed later (its prompt and output so far), keeping the tokens it already produced.
Waiting requests start in arrival order, except that one whose next uncached block another
request is computing waits until that block is in the prefix cache (`KVManager.claim`), while
those behind it go on: a burst on one new prefix computes it once and shares its pages.

A request the scheduler knows is in exactly one place, found by id in `requests`:
- `waiting`: queued to run (its pages, if any, come from the prefix cache);
- `running`: in the batch, growing its pages step by step;
- `reserved`: pages reserved for a prompt whose KV comes from another replica (`reserve`),
  written by the caller, then `import_done` and `admit` move it to `running`;
- `exporting`: finished, its pages kept for the caller to read until `release` (a prefill
  request with `kv_export_from` set).
Overlapped scheduling: `launch(batch)` moves the counters when a step goes to the device, before
its tokens are back, and gives each sampling request a placeholder token; the next `schedule`
plans the following step from there while this one runs, and `update(batch, out)` later puts
the sampled ids in place (steps are updated in launch order). Without overlap, `update` calls
`launch` itself. A request whose last token is on the way is not scheduled again (its update
finishes it by length), and one preempted meanwhile waits for its token before it resumes.
`abort(request_id)` frees the pages wherever the request is; a request that left is forgotten,
so aborting it again, or a request never seen, does nothing.
Plain data in, plain data out: this module imports no torch.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from engine.batch import ModelOutput, ScheduledBatch
from engine.block_allocator import BlockAllocator
from engine.block_hash import block_hashes
from engine.config import EngineConfig
from engine.decode_hold import DecodeHold
from engine.kv_manager import KVManager
from engine.request import Request


@dataclass(frozen=True)
class Reservation:
    """Pages reserved for a prompt whose KV comes from elsewhere: blocks [0, first_block) were
    found in the prefix cache; `num_pages` pages from first_block on await the transfer."""

    first_block: int
    num_pages: int
    block_hashes: list[int]  # chain hashes of the prompt's full blocks
    # Set by the engine: where a transport may write the pages itself (engine/page_import.py's
    # PageImport), None where it cannot (a CPU pool). Opaque here: schedulers import no torch.
    import_to: object | None = None


class Scheduler:
    def __init__(self, cfg: EngineConfig, allocator: BlockAllocator, max_model_len: int,
                 eos_token_ids: tuple[int, ...] = ()) -> None:
        self.cfg = cfg
        self.kv = KVManager(allocator, cfg.enable_prefix_caching)
        self.page_size = allocator.page_size
        self.max_model_len = max_model_len
        self.eos_token_ids = set(eos_token_ids)
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.reserved: dict[str, Request] = {}
        self.exporting: dict[str, Request] = {}
        self.num_preemptions = 0
        # What launched steps ran: prompt tokens (prefill chunks, and recomputation after a
        # preemption), the steps that ran any, and one-token decode rows. Their ratios say how
        # full the steps were (`pdserve_scheduled_*` in /metrics, the GPU benchmarks' step line).
        self.num_prefill_tokens = 0
        self.num_prefill_steps = 0
        self.num_decode_tokens = 0
        self.hold = DecodeHold(cfg.decode_hold_ms / 1e3)

    # -- membership ----------------------------------------------------------------------
    def add(self, req: Request) -> None:
        self._track(req)
        self.waiting.append(req)

    def reserve(self, req: Request) -> Reservation | None:
        """Pages for req's prompt, to be filled from elsewhere: cached prefix pages first, fresh
        pages for the rest. None when the pool cannot hold the prompt now (nothing is kept)."""
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already running")
        # The hashes also identify the prompt to the sender, with or without a prefix cache.
        # (Those the caller has already, in req.block_hashes, are not computed again.)
        req.block_hashes = block_hashes(req.prompt_token_ids, self.page_size, req.block_hashes)
        # Every full block may come from the cache: the first token comes with the KV.
        cached = self.kv.match_prefix(req, max_blocks=len(req.block_hashes))
        rest = req.num_prompt_tokens - req.num_computed_tokens
        if not self.kv.can_grow(req, rest):
            self.kv.free(req)
            req.num_cached_tokens = 0
            return None
        self.kv.grow(req, rest)
        self._track(req)
        self.reserved[req.request_id] = req
        return Reservation(cached, len(req.block_table) - cached, list(req.block_hashes))

    def import_done(self, req: Request, first_block: int) -> None:
        """The reserved pages from `first_block` on hold the prompt's KV now."""
        assert self.reserved.get(req.request_id) is req, f"{req.request_id} is not reserved"
        req.num_computed_tokens = req.num_prompt_tokens
        self.kv.cache_blocks(req, first_block * self.page_size)

    def admit(self, req: Request, first_token: int, logprob=None) -> None:
        """An imported request joins the running batch with the token its prefill sampled."""
        assert req.num_computed_tokens == req.num_prompt_tokens, "admit before import_done"
        del self.reserved[req.request_id]
        self.running.append(req)
        req.output_token_ids.append(first_token)
        req.output_logprobs.append(logprob)
        reason = self.stop_reason(req, first_token)
        if reason:
            self.finish(req, reason)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, req: Request, reason: str) -> None:
        """End a request (stop, length, abort): its pages are freed now, or kept for export."""
        if req.finish_reason is None:
            req.finish_reason = reason
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.reserved.pop(req.request_id, None)
        if req.kv_export_from is not None and reason != "abort" and req.block_table:
            self.exporting[req.request_id] = req
        else:
            self.release(req)

    def abort(self, request_id: str) -> Request | None:
        """Free the pages of request_id wherever it is; None if it is unknown or gone."""
        req = self.requests.get(request_id)
        if req is not None:
            self.exporting.pop(request_id, None)
            self.finish(req, "abort")
        return req

    def release(self, req: Request) -> None:
        """Give back a request's pages; it leaves the scheduler."""
        self.exporting.pop(req.request_id, None)
        self.kv.free(req)
        if self.requests.get(req.request_id) is req:
            del self.requests[req.request_id]

    def check_integrity(self) -> None:
        """The allocator's invariants, and page refcounts equal to the live requests' pages."""
        live = [*self.waiting, *self.running, *self.reserved.values(), *self.exporting.values()]
        assert len({id(r) for r in live}) == len(live), "a request is in two places"
        assert {r.request_id for r in live} == set(self.requests), "requests index out of sync"
        self.kv.check_integrity(live)

    # -- the step ------------------------------------------------------------------------
    def hold_s(self) -> float:
        """Seconds the next decode step still waits for the prompts reserved here to land
        (engine/decode_hold.py); 0: it runs now."""
        if not self.hold.enabled:
            return 0.0
        # prompts of its own: queued, or part-way (a local prefill in chunks) and never held
        prompts = len(self.waiting) + sum(
            r.num_computed_tokens < r.num_prompt_tokens for r in self.running)
        return self.hold.wait_s(len(self.running), len(self.reserved), prompts)

    def schedule(self) -> ScheduledBatch:
        budget = self.cfg.max_num_batched_tokens
        batch = ScheduledBatch([], [])
        if self.hold_s():
            return batch
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if req.num_output_placeholders and self._reaches_length(req):
                i += 1  # its last token is on the way: the update of that step finishes it
                continue
            n = min(req.num_pending_tokens, budget)
            while not self.kv.can_grow(req, n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            if req not in self.running:
                break
            self.kv.grow(req, n)
            batch.add(req, n)
            budget -= n
            i += 1
        # New requests wait while anything was preempted, so a preempted request is not
        # overtaken by the very ones that would push it out again.
        later: list[Request] = []  # waiting for blocks that another request is computing
        while (not preempted and self.waiting and budget > 0
               and len(self.running) < self.cfg.max_num_seqs):
            req = self.waiting[0]
            if req.num_output_placeholders:
                break  # preempted while a step ran: it resumes once that step's token is back
            # At least one token must run so that the step yields logits to sample from.
            max_blocks = (req.num_tokens - 1) // self.page_size
            if self.kv.computed_elsewhere(req, max_blocks):
                # Its next block is on its way into the prefix cache (a burst on one new
                # prefix): it waits for it rather than compute it too; the queue goes on.
                later.append(self.waiting.popleft())
                continue
            self.kv.match_prefix(req, max_blocks)
            n = min(req.num_pending_tokens, budget)
            if not self.kv.can_grow(req, n):
                self.kv.free(req)  # give cached prefix pages back until it can run
                break
            self.waiting.popleft()
            self.running.append(req)
            self.kv.claim(req)
            self.kv.grow(req, n)
            batch.add(req, n)
            budget -= n
        self.waiting.extendleft(reversed(later))
        return batch

    def launch(self, batch: ScheduledBatch) -> None:
        """The batch's step is on its way to the device: its tokens count as computed now, and a
        request that samples gets a placeholder for the token, so that the next `schedule` can
        plan the step after it before this one is back (overlapped scheduling). `update` calls
        this itself when the caller did not."""
        assert not batch.launched, "a batch is launched once"
        self.hold.launched()
        batch.computed_before = [r.num_computed_tokens for r in batch.requests]
        batch.preemptions_before = [r.num_preemptions for r in batch.requests]
        batch.launched = True
        prefill = 0
        for req, n, sampled in zip(batch.requests, batch.num_new_tokens, batch.samples):
            if n == 1 and req.num_computed_tokens >= req.num_prompt_tokens:
                self.num_decode_tokens += 1
            else:
                prefill += n
            req.num_computed_tokens += n
            req.num_output_placeholders += sampled
        self.num_prefill_tokens += prefill
        self.num_prefill_steps += prefill > 0

    def update(self, batch: ScheduledBatch, out: ModelOutput) -> list[Request]:
        """The step is back: cache the full blocks it wrote, replace placeholders by the sampled
        tokens, finish requests. Steps are updated in launch order.

        Returns the requests that produced a token or finished this step.
        """
        if not batch.launched:
            self.launch(batch)
        changed = []
        logprobs = out.logprobs or [None] * len(out.token_ids)
        for req, n, tok, lp, before, preemptions in zip(
                batch.requests, batch.num_new_tokens, out.token_ids, logprobs,
                batch.computed_before, batch.preemptions_before, strict=True):
            if req.finished:  # aborted, or stopped by the step before, while this one ran
                continue
            if req.num_preemptions == preemptions:  # else its pages went back meanwhile
                self.kv.cache_blocks(req, before, before + n)
            if tok is None:
                continue
            req.num_output_placeholders -= 1
            req.output_token_ids.append(tok)
            req.output_logprobs.append(lp)
            changed.append(req)
            reason = self.stop_reason(req, tok)
            if reason:
                self.finish(req, reason)
        return changed

    # -- helpers -------------------------------------------------------------------------
    def stop_reason(self, req: Request, tok: int) -> str | None:
        p = req.params
        if (tok in self.eos_token_ids and not p.ignore_eos) or tok in p.stop_token_ids:
            return "stop"
        if len(req.output_token_ids) >= p.max_tokens or req.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _reaches_length(self, req: Request) -> bool:
        """Whether the request's planned tokens already end it by max_tokens or max_model_len."""
        n_out = len(req.output_token_ids) + req.num_output_placeholders
        return n_out >= req.params.max_tokens or req.num_planned_tokens >= self.max_model_len

    def _track(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already running")
        self.requests[req.request_id] = req

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req)
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

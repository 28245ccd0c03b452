"""Iteration-level scheduler: which requests run how many tokens in the next step.

Each step mixes decode tokens and prefill chunks under `max_num_batched_tokens` and
`max_num_seqs`. Requests can join between any two steps; finished ones leave at once. When the
pool runs out, the latest-arrived running request is preempted: its pages are freed and it is
recomputed later (its prompt and output so far), keeping the tokens it already produced.
Plain data in, plain data out: this module imports no torch.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.block_allocator import BlockAllocator
from engine.block_hash import block_hashes
from engine.config import EngineConfig
from engine.request import Request


@dataclass
class ScheduledBatch:
    requests: list[Request]
    num_new_tokens: list[int]  # tokens each request runs this step

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.requests)


@dataclass
class ModelOutput:
    """Per scheduled request: the sampled token (None for a prefill chunk that samples nothing)."""

    token_ids: list[int | None]
    logprobs: list = field(default_factory=list)  # TokenLogprob | None, aligned with token_ids


class Scheduler:
    def __init__(self, cfg: EngineConfig, allocator: BlockAllocator, max_model_len: int,
                 eos_token_ids: tuple[int, ...] = ()) -> None:
        self.cfg = cfg
        self.allocator = allocator
        self.page_size = allocator.page_size
        self.max_model_len = max_model_len
        self.eos_token_ids = set(eos_token_ids)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    # -- membership ----------------------------------------------------------------------
    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def add_running(self, req: Request) -> None:
        """Admit a request whose pages are already filled (KV imported from a prefill replica)."""
        self.running.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, req: Request, reason: str) -> None:
        """End a request (stop, length, abort) and free its pages now."""
        if req.finish_reason is None:
            req.finish_reason = reason
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        if not req.hold_kv or reason == "abort":
            self.release(req)

    # -- the step ------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        budget = self.cfg.max_num_batched_tokens
        batch = ScheduledBatch([], [])
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_pending_tokens, budget)
            while not self._can_grow(req, n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            if req not in self.running:
                break
            self._grow(req, n)
            batch.requests.append(req)
            batch.num_new_tokens.append(n)
            budget -= n
            i += 1
        # New requests wait while anything was preempted, so a preempted request is not
        # overtaken by the very ones that would push it out again.
        while (not preempted and self.waiting and budget > 0
               and len(self.running) < self.cfg.max_num_seqs):
            req = self.waiting[0]
            if not req.block_table:
                self._match_prefix(req)
            n = min(req.num_pending_tokens, budget)
            if not self._can_grow(req, n):
                self.release(req)  # give cached prefix pages back until it can run
                break
            self.waiting.popleft()
            self.running.append(req)
            self._grow(req, n)
            batch.requests.append(req)
            batch.num_new_tokens.append(n)
            budget -= n
        return batch

    def update(self, batch: ScheduledBatch, out: ModelOutput) -> list[Request]:
        """Advance counters, cache full blocks, append sampled tokens, finish requests.

        Returns the requests that produced a token or finished this step.
        """
        changed = []
        logprobs = out.logprobs or [None] * len(out.token_ids)
        for req, n, tok, lp in zip(batch.requests, batch.num_new_tokens, out.token_ids, logprobs):
            if req.finished:  # aborted while the step ran
                continue
            before = req.num_computed_tokens
            req.num_computed_tokens += n
            self._cache_blocks(req, before)
            if tok is None:
                continue
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

    def _pages_needed(self, req: Request, n: int) -> int:
        total = -(-(req.num_computed_tokens + n) // self.page_size)
        return max(0, total - len(req.block_table))

    def _can_grow(self, req: Request, n: int) -> bool:
        return self.allocator.can_allocate(self._pages_needed(req, n))

    def _grow(self, req: Request, n: int) -> None:
        req.block_table += self.allocator.allocate(self._pages_needed(req, n))

    def _match_prefix(self, req: Request) -> None:
        if not self.cfg.enable_prefix_caching:
            return
        req.block_hashes = block_hashes(req.all_token_ids, self.page_size, req.block_hashes)
        # At least one token must run so that the step yields logits to sample from.
        usable = (req.num_tokens - 1) // self.page_size
        pages = self.allocator.match_prefix(req.block_hashes[:usable])
        req.block_table = pages
        req.num_computed_tokens = len(pages) * self.page_size
        req.num_cached_tokens = max(req.num_cached_tokens, req.num_computed_tokens)

    def _cache_blocks(self, req: Request, before: int) -> None:
        if not self.cfg.enable_prefix_caching:
            return
        first, last = before // self.page_size, req.num_computed_tokens // self.page_size
        if last <= first:
            return
        req.block_hashes = block_hashes(req.all_token_ids, self.page_size, req.block_hashes)
        for i in range(first, last):
            self.allocator.register(req.block_table[i], req.block_hashes[i])

    def release(self, req: Request) -> None:
        if req.block_table:
            self.allocator.free(req.block_table)
        req.block_table = []
        req.num_computed_tokens = 0

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.release(req)
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

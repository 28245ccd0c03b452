"""What one engine step runs and what it gives back, as plain data: the scheduler's
`ScheduledBatch` (requests and how many tokens each runs) and the runner's `ModelOutput` (the
token each sampled). The core loop passes them between its three calls:
`batch = scheduler.schedule()`, `out = runner.execute(batch)`, `scheduler.update(batch, out)`.
No torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.request import Request


@dataclass
class ScheduledBatch:
    requests: list[Request]
    num_new_tokens: list[int]  # tokens each request runs this step
    # Whether each request's step reaches its last planned token, so that it samples the next
    # one (the runner picks its sampled rows with it; `Scheduler.launch` adds placeholders).
    samples: list[bool] = field(default_factory=list)
    # Filled by `Scheduler.launch`: each request's computed tokens and preemption count before
    # the step, so that `update` can tell what the step wrote even after counters moved on.
    launched: bool = False
    computed_before: list[int] = field(default_factory=list)
    preemptions_before: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def add(self, req: Request, n: int) -> None:
        """Schedule n of req's pending tokens (read before launch moves its counters)."""
        self.requests.append(req)
        self.num_new_tokens.append(n)
        self.samples.append(n == req.num_pending_tokens)

    def __len__(self) -> int:
        return len(self.requests)

    def drop_finished(self) -> None:
        """Leave out requests that finished after scheduling (before launch): their pages are
        gone, so the step must not run them."""
        assert not self.launched, "a launched batch keeps its requests"
        keep = [i for i, r in enumerate(self.requests) if not r.finished]
        self.requests = [self.requests[i] for i in keep]
        self.num_new_tokens = [self.num_new_tokens[i] for i in keep]
        self.samples = [self.samples[i] for i in keep]


@dataclass
class ModelOutput:
    """Per scheduled request: the sampled token (None for a prefill chunk that samples nothing)."""

    token_ids: list[int | None]
    logprobs: list = field(default_factory=list)  # TokenLogprob | None, aligned with token_ids

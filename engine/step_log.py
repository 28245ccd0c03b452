"""StepLog: one JSON line per engine step of a step thread, for reading a serving run's timeline.

Set `PDSERVE_STEP_LOG=DIR` in a replica's environment (e.g. the Serve config's `runtime_env`)
and each AsyncEngine in that process appends to `DIR/steps-<pid>-<n>.jsonl`:
`{"t": round start (time.time()), "actions": adds/aborts applied before the step, "step_s":
time in Engine.step, "waiting": requests left queued by the step, "running": ...,
"prefill": prompt tokens launched, "decode": decode rows launched}`. Off by default: the cost is
a write per step. `bench/gpu_token_path.sh` collects them (its header says how).
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

from engine.scheduler import Scheduler

ENV = "PDSERVE_STEP_LOG"
_numbers = itertools.count()


class StepLog:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("a", buffering=1)  # a line at a time: readable mid-run
        self._launched = (0, 0)

    @classmethod
    def from_env(cls) -> StepLog | None:
        where = os.environ.get(ENV)
        if not where:
            return None
        return cls(Path(where) / f"steps-{os.getpid()}-{next(_numbers)}.jsonl")

    def record(self, t: float, actions: int, step_s: float, sched: Scheduler) -> None:
        """After a step: what it launched is the change in the scheduler's counters, and what
        it left waiting is the scheduler's queue now."""
        launched = (sched.num_prefill_tokens, sched.num_decode_tokens)
        prefill, decode = (a - b for a, b in zip(launched, self._launched))
        self._launched = launched
        self.file.write(json.dumps({
            "t": round(t, 6), "actions": actions, "step_s": round(step_s, 6),
            "waiting": len(sched.waiting), "running": len(sched.running), "prefill": prefill,
            "decode": decode}) + "\n")

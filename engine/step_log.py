"""StepLog: one JSON line per engine step of a step thread, for reading a serving run's timeline.

Set `PDSERVE_STEP_LOG=DIR` in a replica's environment (e.g. the Serve config's `runtime_env`)
and each AsyncEngine in that process appends to `DIR/steps-<pid>-<n>.jsonl`:
`{"t": round start (time.time()), "actions": adds/aborts applied before the step, "step_s":
time in Engine.step, "waiting": requests left queued by the step, "running": ...,
"prefill": prompt tokens launched, "decode": decode rows launched, "cpu_s": the step thread's CPU
time in Engine.step, "gc_s": time the process spent collecting garbage meanwhile, and on a GPU
"device_s": the device time of the steps that ended since the round before}`. A step whose
cpu_s is well below its step_s waited: for the GPU, or for the GIL held by another thread of the
replica (its event loop, Ray's threads). On a GPU the host spins in `cudaEventSynchronize`, so
cpu_s equals step_s there (docs/benchmarks.md, runs 150-152), and device_s tells instead: a
step's device time runs from just before its forward was queued to its sampled ids
(`ModelRunner.time_steps`). With overlapped scheduling a round's step ends during the next
round, so over a stretch of decode rounds the sum of device_s against the span of the rounds
says how long the GPU sat idle while the host planned steps. Off by default: the cost is
a write per step.
`bench/gpu_token_path.sh` collects them (its header says how).
"""

from __future__ import annotations

import functools
import gc
import itertools
import json
import os
import time
from pathlib import Path

from engine.scheduler import Scheduler

ENV = "PDSERVE_STEP_LOG"
_numbers = itertools.count()


class GcClock:
    """Seconds the process has spent in garbage collections, whichever thread ran them (a
    collection holds the GIL, so it stalls every Python thread)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._start = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._start


@functools.cache
def gc_clock() -> GcClock:
    """The process's one GcClock: every engine's log reads the same one."""
    return GcClock()


class StepLog:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("a", buffering=1)  # a line at a time: readable mid-run
        self._launched = (0, 0)
        self._gc = gc_clock()
        self._started = (0.0, 0.0)  # the step's start on both clocks
        self._costs = (0.0, 0.0)  # the last step's CPU and GC seconds

    def start_step(self) -> None:
        """Call on the step thread as Engine.step starts."""
        self._started = (time.thread_time(), self._gc.seconds)

    def end_step(self) -> None:
        """Call on the step thread as Engine.step returns: `record` writes what it measured."""
        self._costs = (time.thread_time() - self._started[0], self._gc.seconds - self._started[1])

    @classmethod
    def from_env(cls) -> StepLog | None:
        where = os.environ.get(ENV)
        if not where:
            return None
        return cls(Path(where) / f"steps-{os.getpid()}-{next(_numbers)}.jsonl")

    def record(self, t: float, actions: int, step_s: float, sched: Scheduler,
               device_s: float | None = None) -> None:
        """After a step: what it launched is the change in the scheduler's counters, and what
        it left waiting is the scheduler's queue now; its CPU and GC time are what
        `start_step` / `end_step` measured around Engine.step; `device_s`, the device time of
        the steps that ended since the round before (`Engine.step_device_s`), where timed."""
        cpu_s, gc_s = self._costs
        launched = (sched.num_prefill_tokens, sched.num_decode_tokens)
        prefill, decode = (a - b for a, b in zip(launched, self._launched))
        self._launched = launched
        self.file.write(json.dumps({
            "t": round(t, 6), "actions": actions, "step_s": round(step_s, 6),
            "waiting": len(sched.waiting), "running": len(sched.running), "prefill": prefill,
            "decode": decode, "cpu_s": round(cpu_s, 6), "gc_s": round(gc_s, 6),
            **({} if device_s is None else {"device_s": round(device_s, 6)})}) + "\n")

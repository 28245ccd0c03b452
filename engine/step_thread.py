"""StepThread: the thread that steps one engine, applying between its steps the actions that
the roles submit (adds, aborts, reservations, admissions, calls), so that the engine is never
mutated while a step runs. engine/async_engine.py is its one user.

Contract:
- `submit(request_id, fn)`, from any thread: fn runs on the step thread before the next step, in
  submission order; a thread is started if none runs. An fn that raises fails request_id's
  stream, not the thread.
- The thread steps while the engine has work of this thread's streams (`has_work`), hands
  each step's outputs to the streams (`OutputStreams.deliver`, then one `flush`), and leaves
  after IDLE_EXIT_S with neither work nor actions; the next `submit` starts another. While the
  engine holds its next decode step (`Engine.held_s`, engine/decode_hold.py) it waits instead,
  for the next action or the hold's end.
- `close()` lets the thread finish its step and apply what was submitted before, then returns
  once it has left. A step that raises fails every open stream's request (and aborts it).
- Counters, for /metrics: `num_steps`; `step_seconds` inside `Engine.step`; `round_seconds`,
  the whole rounds that stepped (actions + step + hand-off: the difference is the host time
  the serving path adds between steps); `action_seconds` of which applying actions; and
  `device_seconds`, the GPU's time in the steps (0 off CUDA), against which the rounds show how
  long the GPU sat idle between steps; the decode holds begun (`DecodeHold.num_holds`) and
  `hold_seconds`, the time the thread waited in them.

Why a thread of its own rather than a step per `asyncio.to_thread` call: between two steps the
old loop had to be woken on the event loop (behind whatever else the serving replica's loop was
doing), run every ready callback and hand the next step to a pool thread; on the H200 the GPU
sat idle for those hand-offs (docs/benchmarks.md, the token path).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable

from engine.llm_engine import Engine
from engine.output_streams import OutputStreams
from engine.step_log import StepLog

log = logging.getLogger(__name__)
IDLE_EXIT_S = 1.0  # the step thread leaves after this long without work
# The StepThread that drives each Engine: only it may step the engine (a test may wrap one
# Engine in a new AsyncEngine while the old one's thread is still winding down).
_DRIVERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class StepThread:
    def __init__(self, engine: Engine, streams: OutputStreams) -> None:
        self.engine, self.streams = engine, streams
        _DRIVERS[engine] = self
        self._cond = threading.Condition()
        self._pending: list[tuple[str, Callable[[], None]]] = []  # under _cond
        self._running = False  # a thread is alive (under _cond)
        self._closed = False
        self.thread: threading.Thread | None = None
        self.num_steps = 0
        self.step_seconds = self.round_seconds = self.action_seconds = 0.0
        self.device_seconds = 0.0
        self.hold_seconds = 0.0  # waited in decode holds (engine/decode_hold.py)
        self._step_log = StepLog.from_env()  # PDSERVE_STEP_LOG: a line per step

    def submit(self, request_id: str, fn: Callable[[], None]) -> None:
        with self._cond:
            self._pending.append((request_id, fn))
            if self._running:
                self._cond.notify()
                return
            self._running = True
            self._closed = False
            self.thread = threading.Thread(target=self._run, name="pdserve-step", daemon=True)
            self.thread.start()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def counters(self) -> dict[str, float]:
        """The counters above by their /metrics names (a `Metrics` counter source)."""
        return {"pdserve_engine_steps_total": self.num_steps,
                "pdserve_engine_step_seconds_total": self.step_seconds,
                "pdserve_engine_round_seconds_total": self.round_seconds,
                "pdserve_engine_action_seconds_total": self.action_seconds,
                "pdserve_engine_device_seconds_total": self.device_seconds,
                "pdserve_engine_decode_holds_total": self.engine.scheduler.hold.num_holds,
                "pdserve_engine_decode_hold_seconds_total": self.hold_seconds}

    def has_work(self) -> bool:
        """Requests of these streams to step. Every engine request of ours has an open stream
        (a stream that ends early aborts its request), so with no stream open the engine's
        remaining work is someone else's (a test driving the same Engine through `LLM`), which
        this thread must not step."""
        return bool(self.streams) and self.engine.has_unfinished()

    # -- the thread ---------------------------------------------------------------------------
    def _next_actions(self) -> list[tuple[str, Callable[[], None]]] | None:
        """The actions to apply before the next step; None when the thread should leave:
        closed (once what was submitted before is applied), replaced as the engine's driver, or
        idle for IDLE_EXIT_S."""
        with self._cond:
            idle = not self._pending and not self.has_work()
            if idle:
                self._cond.wait_for(lambda: self._pending or self._closed, IDLE_EXIT_S)
            elif not self._pending and (held := self.engine.held_s()):
                # a decode hold: until an admission (or another action) comes, or it ends
                start = time.perf_counter()
                self._cond.wait_for(lambda: self._pending or self._closed, held)
                self.hold_seconds += time.perf_counter() - start
            # After an idle wait only a submitted action keeps the thread: work that appeared
            # in the engine meanwhile is someone else's (a test's LLM on the same Engine).
            if _DRIVERS.get(self.engine) is not self or not self._pending and (
                    self._closed or idle or not self.has_work()):
                self._running = False
                return None
            pending, self._pending = self._pending, []
            return pending

    def _run(self) -> None:
        try:
            while (pending := self._next_actions()) is not None:
                start = time.perf_counter()
                self._apply(pending)
                if not self._closed and self.has_work() and not self.engine.held_s():
                    step_s = self._step()
                    self.round_seconds += time.perf_counter() - start
                    if self._step_log is not None and step_s is not None:
                        # The round's start on the wall clock: other processes' logs line up.
                        self._step_log.record(time.time() - (time.perf_counter() - start),
                                              len(pending), step_s, self.engine.scheduler,
                                              self.engine.step_device_s)
        except BaseException:  # a bug here must not leave the streams waiting forever
            log.exception("engine step thread failed")
            with self._cond:
                self._running = False
            self._fail_all(RuntimeError("the engine step thread failed"))
            raise

    def _apply(self, pending: list[tuple[str, Callable[[], None]]]) -> None:
        start = time.perf_counter()
        for request_id, fn in pending:
            try:
                fn()
            except Exception as e:  # a bad request must not stop the loop
                log.exception("engine action for %s failed", request_id)
                self.streams.fail(request_id, e)
        self.action_seconds += time.perf_counter() - start
        self.streams.flush()  # first tokens of the requests admitted just now

    def _step(self) -> float | None:
        """One engine step and the hand-off of its outputs; returns the step's seconds, or None
        when it failed (its requests failed with it)."""
        if self._step_log is not None:
            self._step_log.start_step()
        start = time.perf_counter()
        try:
            outputs = self.engine.step()
        except Exception as e:
            log.exception("engine step failed; failing its requests")
            self._fail_all(e)
            return None
        step_s = time.perf_counter() - start
        if self._step_log is not None:
            self._step_log.end_step()
        self.step_seconds += step_s
        self.device_seconds += self.engine.step_device_s or 0.0
        self.num_steps += 1
        for out in outputs:
            self.streams.deliver(out)
        self.streams.flush()
        return step_s

    def _fail_all(self, error: BaseException) -> None:
        for request_id in self.streams.ids():
            self.engine.abort(request_id)
            self.streams.fail(request_id, error)
        self.streams.flush()

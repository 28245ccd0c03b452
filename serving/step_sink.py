"""StepSink: what every per-step output sink of a serving replica shares (an `OutputSink`,
engine/async_engine.py). Outputs gather during a step; `flush` records their timings in the
replica's metrics and hands the step's batch, pickled as `RequestOutput.to_wire` tuples, to
`send`, unless the sink is lost. A subclass sends (a mailbox actor, a TCP connection) and, when
its consumer is gone, calls `mark_lost`: `on_lost(request_ids)` then aborts the requests still
open on it, once."""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from engine.metrics import Metrics, StreamRecorder, record_step
from engine.outputs import RequestOutput


class StepSink:
    def __init__(self, metrics: Metrics, on_lost: Callable[[list[str]], None]) -> None:
        self.metrics, self.on_lost = metrics, on_lost
        self.pending: list[RequestOutput] = []
        self.recorders: dict[str, StreamRecorder] = {}
        self.lost = False

    def open(self, request_id: str, start: float) -> None:
        self.recorders[request_id] = StreamRecorder(self.metrics, start)

    def close(self, request_id: str) -> None:
        self.recorders.pop(request_id, None)

    @contextmanager
    def opened(self, request_id: str) -> Iterator[None]:
        """The request is open on this sink (its outputs timed from now, and aborted if the
        sink is lost) until the block ends."""
        self.open(request_id, time.perf_counter())
        try:
            yield
        finally:
            self.close(request_id)

    def put(self, out: RequestOutput) -> None:
        self.pending.append(out)

    def flush(self) -> None:
        batch, self.pending = self.pending, []
        if not batch:
            return
        record_step(self.metrics, self.recorders, batch, time.perf_counter())
        if self.lost:
            return
        self.send(pickle.dumps([out.to_wire() for out in batch],
                               protocol=pickle.HIGHEST_PROTOCOL))

    def send(self, blob: bytes) -> None:
        """(Step thread.) Send one step's pickled batch."""
        raise NotImplementedError

    def mark_lost(self) -> None:
        if not self.lost:
            self.lost = True
            self.on_lost(list(self.recorders))

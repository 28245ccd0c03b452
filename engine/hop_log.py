"""HopLog: when each request passed each hop of the serving path, for reading where a burst's
time goes between the client and the engines (the step log, engine/step_log.py, says what each
step ran; this says which request waited where).

Set `PDSERVE_HOP_LOG=DIR` in the replicas' environment and every process appends a line
`{"t": time.time(), "id": request id, "hop": name}` to `DIR/hops-<pid>.jsonl` each time a
request passes a hop (`hop(request_id, name)`); a process that passes none writes no file.
Hops are named `<where>.<what>`:
- the ingress's: `ingress.http` (the app's HTTP arrival, under the X-Request-Id, not the
  engine's id), `ingress.call` (the call to the serving deployment), `ingress.sent` (the
  batcher's call, with `submit_batch` > 1), `ingress.first` (the first output back);
- the decode replica's: `decode.recv`, `decode.prefill_call` (made before the reservation
  is, decode/worker.py), `decode.prefill_sent` (the batcher's call, with
  `decode.prefill_batch` > 1), `decode.reserved`, `decode.kv_handle` (layer-wise transports),
  `decode.prefill_done`, `decode.kv_in`;
- the prefill worker's: `prefill.recv`, `prefill.done`;
- the engine's, on its step thread: `engine.add`, `engine.reserve`, `engine.admit`.
`bench/hop_report.py` reads the files of all processes. Off by default: `hop` is then one test
of a global.
"""

from __future__ import annotations

import atexit
import collections
import json
import os
import threading
import time
from pathlib import Path

ENV = "PDSERVE_HOP_LOG"


class HopLog:
    """The hot path only queues (time, id, hop): ~0.6 us. A thread of its own formats and
    writes the lines every FLUSH_S (~2 us a line) and at the process's exit. (Written at each
    hop, a line cost the decode replica ~70 us of CPU on a 2-core machine, by py-spy during
    bursts of 128 requests, where the hops it measures take ~1 ms of CPU each.)"""

    FLUSH_S = 0.1

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("a")
        self._queue: collections.deque[tuple[float, str, str]] = collections.deque()
        self._writing = threading.Lock()
        self._closed = threading.Event()
        threading.Thread(target=self._write_forever, name="pdserve-hop-log", daemon=True).start()
        atexit.register(self.close)

    def record(self, request_id: str, name: str) -> None:
        self._queue.append((time.time(), request_id, name))  # deque: safe from any thread

    def flush(self) -> None:
        with self._writing:
            lines = []
            while self._queue:
                t, request_id, name = self._queue.popleft()
                lines.append(f'{{"t": {t:.6f}, "id": {json.dumps(request_id)}, "hop": "{name}"}}\n')
            if lines:
                self.file.write("".join(lines))
                self.file.flush()

    def close(self) -> None:
        self._closed.set()
        self.flush()

    def _write_forever(self) -> None:
        while not self._closed.wait(self.FLUSH_S):
            self.flush()


_where: str | None = os.environ.get(ENV) or None
_log: HopLog | None = None
_opening = threading.Lock()


def reopen() -> str | None:
    """Read `PDSERVE_HOP_LOG` again (it is read at import: tests set it after); returns it."""
    global _where, _log
    if _log is not None:
        _log.close()
    _where, _log = os.environ.get(ENV) or None, None
    return _where


def hop(request_id: str, name: str) -> None:
    """`request_id` passed hop `name` now (a no-op unless PDSERVE_HOP_LOG is set)."""
    if _where is not None:
        _open().record(request_id, name)


def flush() -> None:
    """Write what is queued now (the log's thread does every FLUSH_S)."""
    if _log is not None:
        _log.flush()


def _open() -> HopLog:
    global _log
    if _log is None:  # the first hop of this process (two threads may race to it)
        with _opening:
            if _log is None:
                _log = HopLog(Path(_where) / f"hops-{os.getpid()}.jsonl")
    return _log

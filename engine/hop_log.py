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
- the decode worker's: `decode.recv`, `decode.reserved`, `decode.prefill_call`,
  `decode.kv_handle` (layer-wise transports), `decode.prefill_done`, `decode.kv_in`;
- the prefill worker's: `prefill.recv`, `prefill.done`;
- the engine's, on its step thread: `engine.add`, `engine.reserve`, `engine.admit`.
`bench/hop_report.py` reads the files of all processes. Off by default: `hop` is then one test
of a global.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

ENV = "PDSERVE_HOP_LOG"


class HopLog:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("a", buffering=1)  # a line at a time: nothing lost at a kill
        self._lock = threading.Lock()  # the step thread and the event loop both write

    def record(self, request_id: str, name: str) -> None:
        line = json.dumps({"t": round(time.time(), 6), "id": request_id, "hop": name}) + "\n"
        with self._lock:
            self.file.write(line)


_where: str | None = os.environ.get(ENV) or None
_log: HopLog | None = None
_opening = threading.Lock()


def reopen() -> str | None:
    """Read `PDSERVE_HOP_LOG` again (it is read at import: tests set it after); returns it."""
    global _where, _log
    _where, _log = os.environ.get(ENV) or None, None
    return _where


def hop(request_id: str, name: str) -> None:
    """`request_id` passed hop `name` now (a no-op unless PDSERVE_HOP_LOG is set)."""
    if _where is not None:
        _open().record(request_id, name)


def _open() -> HopLog:
    global _log
    if _log is None:  # the first hop of this process (two threads may race to it)
        with _opening:
            if _log is None:
                _log = HopLog(Path(_where) / f"hops-{os.getpid()}.jsonl")
    return _log

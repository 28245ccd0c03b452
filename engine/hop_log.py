"""HopLog: when each request passed each hop of the serving path, for reading where a burst's
time goes between the client and the engines (the step log, engine/step_log.py, says what each
step ran; this says which request waited where).

Set `PDSERVE_HOP_LOG=DIR` in the replicas' environment and every process appends a line
`{"t": time.time(), "id": request id, "hop": name}` to `DIR/hops-<pid>.jsonl` each time a
request passes a hop (`hop(request_id, name)`). Hops are named `<where>.<what>`: the ingress's
(`ingress.http`, `ingress.call`, `ingress.sent`), the decode worker's (`decode.recv`,
`decode.reserved`, `decode.prefill_call`, `decode.kv_handle`, `decode.prefill_done`,
`decode.kv_in`), the prefill worker's (`prefill.recv`, `prefill.done`) and the engine's, on
its step thread (`engine.add`, `engine.reserve`, `engine.admit`). `bench/hop_report.py`
reads the files of all processes. Off by default: `hop` is then one test of a global.
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


def _from_env() -> HopLog | None:
    where = os.environ.get(ENV)
    return HopLog(Path(where) / f"hops-{os.getpid()}.jsonl") if where else None


_log = _from_env()


def reopen() -> HopLog | None:
    """Read `PDSERVE_HOP_LOG` again (the process's log is opened at import: tests set it after)."""
    global _log
    _log = _from_env()
    return _log


def hop(request_id: str, name: str) -> None:
    """`request_id` passed hop `name` now (a no-op unless PDSERVE_HOP_LOG is set)."""
    if _log is not None:
        _log.record(request_id, name)

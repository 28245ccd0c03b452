"""A one-line progress bar on stderr (redrawn at most every 0.1 s; silent when disabled)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(
        self, total: int, desc: str = "", enabled: bool = True, stream: TextIO | None = None
    ) -> None:
        self.total = total
        self.desc = desc
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self.failed = 0
        self._start = time.perf_counter()
        self._last_draw = 0.0

    def update(self, ok: bool = True) -> None:
        self.done += 1
        self.failed += not ok
        now = time.perf_counter()
        if self.done == self.total or now - self._last_draw >= 0.1:
            self._last_draw = now
            self._draw(now)

    def close(self) -> None:
        if self.enabled:
            self._draw(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self, now: float) -> None:
        if not self.enabled:
            return
        width = 30
        frac = self.done / self.total if self.total else 1.0
        bar = "#" * int(frac * width) + "." * (width - int(frac * width))
        elapsed = now - self._start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        fail = f" {self.failed} failed" if self.failed else ""
        count = f"{self.done}/{self.total}"
        self.stream.write(f"\r{self.desc} [{bar}] {count} {elapsed:6.1f}s {rate:6.2f} req/s{fail}")
        self.stream.flush()

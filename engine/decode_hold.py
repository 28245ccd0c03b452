"""DecodeHold: a decode step that waits, a bounded time, for the rows on their way to its batch.

Why: where a decode replica shares its GPU with a prefill replica (CUDA MPS), its steps run
between the prefill's kernels. A decode step reads every weight once whatever its batch, so on
the H100 one of 11 rows costs the GPU about what one of 128 does (~10 ms), and it slows the very
prompts that are about to fill the batch: in a burst, the prefill replica's 16K-token chunks
took 10-20% longer while the decode replica stepped its first rows (docs/benchmarks.md, run
154). Holding those steps until the prompts land gives the GPU to the prefill, and the rows
then decode together, at the price of a longer gap after the first tokens of the rows that came
first (their first token is not delayed: it comes with the KV).

The rule: a decode step is held while this engine runs no prompt of its own (none waiting,
none part-way through its prompt: `prompts`), has rows to decode, and the prompts reserved here
(their KV on the way) are at least as many as those rows, so that the batch would at least
double; and for at most `max_wait_s` from when the hold began. A step launched ends the hold;
the next may begin at once, so a row waits at most `max_wait_s` between two of its steps.
Under a steady load of long answers the running batch outnumbers the prompts in flight and
nothing is held; with short answers to long prompts it may not, and most steps would wait.
`max_wait_s` 0 (the default) never holds. Prompts that never land (their prefill replica lost)
slow the rows to one step per `max_wait_s` until their reservations end (retried elsewhere,
or failed); they never stop them.

Measured (1P1D on one H100, the token-path workload, 1000 ms; runs 156-157): 266-277 decode
steps against 301-304, ITL p99 42 ms against 94-102, tokens/s within the run-to-run spread
(0.915-0.928x the engine alone against 0.913-0.917x).

Contract (the scheduler's, on the engine's one thread):
- `wait_s(running, reserved, prompts)`: the seconds the next decode step should still wait; 0:
  step now. The first call that finds the rule true starts the hold's clock.
- `enabled`: whether it can ever hold (the caller may skip counting `prompts` otherwise).
- `launched()`: a step went to the device; the hold, if any, is over.
Plain data: no torch.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class DecodeHold:
    def __init__(self, max_wait_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_wait_s = max_wait_s
        self.clock = clock
        self._since: float | None = None  # when the hold in force began
        self.num_holds = 0  # holds begun (for /metrics: how often the rule fired)

    @property
    def enabled(self) -> bool:
        return self.max_wait_s > 0

    def wait_s(self, running: int, reserved: int, prompts: int) -> float:
        if not self.enabled or prompts or not running or reserved < running:
            self._since = None
            return 0.0
        now = self.clock()
        if self._since is None:
            self._since = now
            self.num_holds += 1
        return max(0.0, self._since + self.max_wait_s - now)

    def launched(self) -> None:
        self._since = None

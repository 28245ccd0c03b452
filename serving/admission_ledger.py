"""Cluster-wide admission: one ledger of concurrency slots shared by every ingress replica.

`limits.max_concurrent_requests` holds for the whole application, not per ingress replica. Each
ingress replica (a holder) asks a named Ray actor, the ledger (serving/ledger_actor.py is the
Ray side: the actor, its port and the replica's holder), for a slot per request, at
admission, before the body is read; tokens never touch it. Requests that arrive together share
one claim message (`SharedSlots`). A slot is given back with a message that is not waited for
(the response has been sent by then).

Every message carries the holder's whole count (slots in use there, plus claims still in
flight), not a delta, and the ledger sets that holder's count to it. So nothing is lost for
good: a ledger that restarts, or a holder dropped while it was briefly silent, is counted right
again by the holder's next message. Holders re-assert their count every RENEW_S; one silent for
STALE_S (a replica that died) is dropped with its slots. A claim still in flight is counted as
held, so a claim that is refused counts until the holder's next message: the errors all lean
towards refusing, never towards admitting past the limit.

Order: one holder's messages must apply in the order sent, else an older count could overwrite
a newer one; a plain (not async, one-threaded) Ray actor runs one caller's calls in order.

The ledger unreachable (dead, restarting, slower than CLAIM_TIMEOUT_S): the holder fails open
to a local share, `limit // live holders` as the ledger last reported them (the whole limit if
it never answered, which is the old per-replica gate). Failing closed would turn a control-plane
fault into a full outage of the data plane; the share keeps the cluster near its limit while
the replica count stays put, and each serving replica's own limits (max_num_seqs, KV pages)
still hold. The holder probes the ledger every RENEW_S meanwhile and goes back to it at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

log = logging.getLogger(__name__)

RENEW_S = 1.0  # how often a holder re-asserts its count (and probes a ledger it lost)
STALE_S = 10.0  # a holder silent this long is dropped with its slots (its replica died)
CLAIM_TIMEOUT_S = 2.0  # a claim slower than this is decided by the local share
IDLE_EXIT_S = 120.0  # a ledger no holder has spoken to this long ends itself (app deleted)
NAMESPACE = "pdserve"


class Ledger:
    """The counts; plain data, unit-tested without Ray. `now` is injectable for tests."""

    def __init__(self, stale_s: float = STALE_S, now: Callable[[], float] = time.monotonic):
        self.stale_s, self._now = stale_s, now
        self._held: dict[str, int] = {}
        self._seen: dict[str, float] = {}
        self.last_call = now()

    def claim(self, holder: str, held: int, limit: int, want: int = 1) -> tuple[int, int]:
        """Sets `holder`'s count to `held`, then takes up to `want` more slots while the total
        stays within `limit`. Returns (slots granted, live holders)."""
        self.renew(holder, held)
        granted = max(0, min(want, limit - sum(self._held.values())))
        self._held[holder] += granted
        return granted, len(self._held)

    def renew(self, holder: str, held: int) -> int:
        """Sets `holder`'s count to `held` and drops silent holders; returns live holders."""
        now = self.last_call = self._now()
        for name in [h for h, t in self._seen.items() if now - t > self.stale_s]:
            log.warning("admission holder %s silent for %.0f s: its %d slots are freed",
                        name, now - self._seen[name], self._held[name])
            del self._held[name], self._seen[name]
        self._held[holder], self._seen[holder] = max(held, 0), now
        return len(self._held)

    def counts(self) -> dict[str, int]:
        return dict(self._held)

    def idle_s(self) -> float:
        return self._now() - self.last_call


class LedgerPort(Protocol):
    """How a holder reaches the ledger: in process (tests, LocalLedger) or a Ray actor. Each
    call sends its message before it returns (the answer is awaited later), so that messages
    leave in the order the holder's counts were taken; a port that cannot send raises."""

    def claim(self, holder: str, held: int, limit: int,
              want: int) -> Awaitable[tuple[int, int]]: ...

    def renew(self, holder: str, held: int) -> Awaitable[int]: ...

    def renew_nowait(self, holder: str, held: int) -> None: ...


class LocalLedger:
    """A Ledger in this process: several SharedSlots over one stand for several replicas."""

    def __init__(self, ledger: Ledger | None = None) -> None:
        self.ledger = ledger or Ledger()
        self.down = False  # tests: behave as an unreachable ledger

    def _check(self) -> None:
        if self.down:
            raise ConnectionError("admission ledger unreachable")

    def claim(self, holder: str, held: int, limit: int, want: int) -> Awaitable[tuple[int, int]]:
        self._check()
        return _done(self.ledger.claim(holder, held, limit, want))

    def renew(self, holder: str, held: int) -> Awaitable[int]:
        self._check()
        return _done(self.ledger.renew(holder, held))

    def renew_nowait(self, holder: str, held: int) -> None:
        if not self.down:
            self.ledger.renew(holder, held)


async def _done(value: Any) -> Any:
    return value


class SharedSlots:
    """One ingress replica's side: `acquire()` before a request is admitted, `release()` after
    its response. `held` counts this replica's slots in use, whoever granted them (the ledger,
    or the local share while the ledger was away): that is what it asserts.

    Messages are shared under bursts: while one claim is on its way, the acquires that arrive
    wait and then go as one claim for all of them (`want`), and the releases of one event-loop
    turn send one count. A burst of N requests costs a few messages, not N (each one a call
    that the one-threaded ledger answers in turn, ~1 ms apiece on a busy host)."""

    def __init__(self, port: LedgerPort, holder: str, limit: int,
                 claim_timeout_s: float = CLAIM_TIMEOUT_S) -> None:
        self.port, self.holder, self.limit = port, holder, limit
        self.claim_timeout_s = claim_timeout_s
        self.held = 0
        self.pending = 0  # acquires not yet decided (queued, or in a claim on its way)
        self.live_holders = 1  # as the ledger last said; sizes the local share
        self.ledger_up = True
        self.num_fallbacks = 0  # admission decisions taken locally (ledger away)
        self.num_claims = 0  # claim messages sent
        self._queued: list[asyncio.Future] = []  # acquires waiting for the next claim
        self._granted = 0  # acquires answered with a slot that have not taken it yet
        self._sender: asyncio.Task | None = None  # sends claims while any are queued
        self._count_due = False  # a release's count is to be sent this loop turn

    def local_share(self) -> int:
        return max(1, self.limit // self.live_holders)

    async def acquire(self) -> bool:
        """A slot for one request, or False (the limit is taken cluster-wide)."""
        if self.held + self.pending >= self.limit:  # refused without asking: cannot fit
            return False
        self.pending += 1
        try:
            if self.ledger_up:
                answer = asyncio.get_running_loop().create_future()
                self._queued.append(answer)
                if self._sender is None:
                    self._sender = asyncio.create_task(self._send_claims())
                try:
                    granted = await answer  # None: the ledger did not answer, decide here
                except asyncio.CancelledError:
                    if answer.done() and not answer.cancelled() and answer.result():
                        self._granted -= 1  # not taken: counted there until the next message
                    raise
                if granted is not None:
                    self._granted -= granted
                    return self._take(granted)
            self.num_fallbacks += 1
            # The other undecided acquires count as held (see top), as they would at the ledger.
            return self._take(self.held + self.pending - 1 < self.local_share())
        finally:
            self.pending -= 1

    async def _send_claims(self) -> None:
        """One claim for the queued acquires, then the next for those queued meanwhile. Each
        claim asserts the slots held and those granted but not yet taken (the acquires resume
        after this loop sends the next claim); no other claim of this holder is on its way."""
        try:
            while self._queued:
                batch, self._queued = [f for f in self._queued if not f.done()], []
                if not batch:
                    continue
                granted = None
                if self.ledger_up:
                    self.num_claims += 1
                    try:
                        granted, self.live_holders = await asyncio.wait_for(
                            self.port.claim(self.holder, self.held + self._granted,
                                            self.limit, len(batch)),
                            self.claim_timeout_s)
                    except (asyncio.CancelledError, KeyboardInterrupt):
                        raise
                    except BaseException as e:  # unreachable or too slow: fail open, see top
                        self._lost(e)
                for answer in batch:  # grants go to the acquires still waiting, in order
                    if answer.done():  # cancelled (client gone): its grant, if any, is
                        continue  # counted by the ledger until this holder's next message
                    answer.set_result(None if granted is None else granted > 0)
                    if granted:
                        self._granted += 1
                        granted -= 1
        finally:
            self._sender = None

    def _take(self, granted: bool) -> bool:
        self.held += granted
        return granted

    def _lost(self, e: BaseException) -> None:
        if self.ledger_up:
            log.warning("admission ledger unreachable (%r): admitting up to a local share "
                        "of %d until it answers", e, self.local_share())
        self.ledger_up = False

    def release(self) -> None:
        self.held -= 1
        if not self.ledger_up or self._count_due:
            return  # away: the renewals assert the count later; due: that message carries it
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop here: send at once
            self._send_count()
            return
        self._count_due = True
        loop.call_soon(self._send_count)

    def _send_count(self) -> None:
        self._count_due = False
        if self.ledger_up:
            try:
                self.port.renew_nowait(self.holder, self.held + self.pending)
            except Exception as e:  # the renewals correct the count once it is back
                self._lost(e)

    async def renew(self) -> None:
        """Re-asserts this holder's count; brings the ledger back into use once it answers."""
        try:
            self.live_holders = await asyncio.wait_for(
                self.port.renew(self.holder, self.held + self.pending), self.claim_timeout_s)
        except (asyncio.CancelledError, KeyboardInterrupt):
            raise
        except BaseException as e:
            self._lost(e)
            return
        if not self.ledger_up:
            log.warning("admission ledger reachable again")
        self.ledger_up = True

    async def run_renewals(self, every_s: float = RENEW_S) -> None:
        while True:
            await asyncio.sleep(every_s)
            await self.renew()

"""The admission ledger (serving/admission_ledger.py) without Ray: exact counts across holders,
counts re-asserted (a refused claim in flight errs towards refusing), silent holders dropped
after the stale bound and counted again when they speak, a ledger restart healed by the next
renewals, and the fail-open local share while the ledger is unreachable."""

from __future__ import annotations

import asyncio

import pytest

from serving.admission_ledger import Ledger, LocalLedger, SharedSlots

pytestmark = pytest.mark.anyio


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_ledger_counts_across_holders_exactly() -> None:
    ledger = Ledger()
    assert [ledger.claim("a", n, 3)[0] for n in range(2)] == [True, True]
    assert ledger.claim("b", 0, 3) == (True, 2)
    assert ledger.claim("b", 1, 3) == (False, 2)  # 2 + 1 taken: full
    assert ledger.claim("a", 2, 3) == (False, 2)
    assert ledger.counts() == {"a": 2, "b": 1}
    assert ledger.renew("a", 1) == 2  # a gave one back
    assert ledger.claim("b", 1, 3) == (True, 2)
    assert ledger.counts() == {"a": 1, "b": 2}
    ledger.renew("b", -1)  # never below zero
    assert ledger.counts() == {"a": 1, "b": 0}


def test_silent_holder_is_dropped_after_the_bound_and_counted_again() -> None:
    clock = Clock()
    ledger = Ledger(stale_s=10, now=clock)
    ledger.claim("a", 2, 4)
    ledger.claim("b", 0, 4)
    assert ledger.counts() == {"a": 3, "b": 1}
    clock.t = 10  # exactly the bound: still counted
    assert ledger.claim("b", 1, 4) == (False, 2)
    clock.t = 10.5  # a has been silent for more than 10 s: its 3 slots are freed
    assert ledger.claim("b", 1, 4) == (True, 1)
    assert ledger.counts() == {"b": 2}
    # a was alive after all (a long pause): its next message asserts its 3 slots again
    assert ledger.renew("a", 3) == 2
    assert ledger.counts() == {"a": 3, "b": 2}  # over the limit for now: no new grants
    assert ledger.claim("b", 2, 4) == (False, 2)


async def test_shared_slots_hold_the_limit_across_two_replicas() -> None:
    port = LocalLedger()
    a, b = SharedSlots(port, "a", 3), SharedSlots(port, "b", 3)
    assert [await a.acquire(), await b.acquire(), await a.acquire()] == [True] * 3
    assert [await a.acquire(), await b.acquire()] == [False, False]
    assert (a.held, b.held, port.ledger.counts()) == (2, 1, {"a": 2, "b": 1})
    a.release()
    await asyncio.sleep(0)  # a release's count goes out on the next turn of the loop
    assert port.ledger.counts() == {"a": 1, "b": 1}
    assert await b.acquire() and not await a.acquire()
    b.release(), b.release(), a.release()
    await asyncio.sleep(0)
    assert port.ledger.counts() == {"a": 0, "b": 0}
    assert (a.num_fallbacks, b.num_fallbacks) == (0, 0)


class SlowPort(LocalLedger):
    """Answers claims only when the test says so; the ledger applies them when sent."""

    def __init__(self) -> None:
        super().__init__()
        self.go = asyncio.Event()

    def claim(self, holder: str, held: int, limit: int, want: int):
        answer = self.ledger.claim(holder, held, limit, want)

        async def later():
            await self.go.wait()
            return answer

        return later()


async def test_acquires_behind_a_claim_on_its_way_go_as_one_claim() -> None:
    port = SlowPort()
    a = SharedSlots(port, "a", 3)
    tasks = [asyncio.create_task(a.acquire())]
    await asyncio.sleep(0)  # the first claim is on its way: the next two wait behind it
    tasks += [asyncio.create_task(a.acquire()) for _ in range(2)]
    await asyncio.sleep(0)
    assert port.ledger.counts() == {"a": 1} and (a.pending, a.num_claims) == (3, 1)
    assert not await a.acquire()  # 3 undecided here: refused without asking
    port.go.set()
    assert await asyncio.gather(*tasks) == [True, True, True]
    assert (a.held, a.pending, a.num_claims) == (3, 0, 2)  # the two went as one claim
    a.release()
    await asyncio.sleep(0)
    assert port.ledger.counts() == {"a": 2}


async def test_a_burst_is_one_claim_and_a_partial_grant_refuses_the_rest() -> None:
    port = LocalLedger()
    a, b = SharedSlots(port, "a", 8), SharedSlots(port, "b", 8)
    assert await b.acquire() and await b.acquire() and await b.acquire()
    got = await asyncio.gather(*[a.acquire() for _ in range(7)])
    assert got == [True] * 5 + [False] * 2 and a.num_claims == 1
    assert port.ledger.counts() == {"a": 5, "b": 3}
    for _ in range(5):
        a.release()
    await asyncio.sleep(0)
    assert port.ledger.counts() == {"a": 0, "b": 3}  # one message for the five releases


async def test_a_claim_right_after_another_counts_the_slots_it_granted() -> None:
    """The next claim leaves as soon as the previous answer is in, before the acquires it
    answered have taken their slots: it must assert them, or the ledger would grant them again."""
    port = LocalLedger()
    a, b = SharedSlots(port, "a", 8), SharedSlots(port, "b", 8)
    for _ in range(3):
        assert await b.acquire()
    first = [asyncio.create_task(a.acquire()) for _ in range(5)]
    await asyncio.sleep(0)  # the five queue and start the sender,
    await asyncio.sleep(0)  # which sends them as one claim
    second = [asyncio.create_task(a.acquire()) for _ in range(3)]
    assert await asyncio.gather(*first, *second) == [True] * 5 + [False] * 3
    assert a.num_claims == 2 and a.held == 5
    assert port.ledger.counts() == {"a": 5, "b": 3}


async def test_an_acquire_cancelled_on_the_way_leans_towards_refusing() -> None:
    port = SlowPort()
    a = SharedSlots(port, "a", 2)
    first = asyncio.create_task(a.acquire())
    await asyncio.sleep(0)  # the acquire queues and starts the sender,
    await asyncio.sleep(0)  # which sends the claim: granted there, the answer held back
    assert a.num_claims == 1 and port.ledger.counts() == {"a": 1}
    first.cancel()  # the client went away
    with pytest.raises(asyncio.CancelledError):
        await first
    port.go.set()
    await asyncio.sleep(0)
    assert (a.held, a.pending) == (0, 0)
    assert port.ledger.counts() == {"a": 1}  # one too many there, never one too few
    await a.renew()  # the next message puts it right
    assert port.ledger.counts() == {"a": 0}


async def test_counts_sent_while_a_claim_is_on_its_way_count_it_as_held() -> None:
    port = SlowPort()
    a, b = SharedSlots(port, "a", 3), SharedSlots(port, "b", 3)
    port.go.set()
    assert await a.acquire() and await b.acquire() and await b.acquire()
    port.go.clear()
    b.release()
    await asyncio.sleep(0)
    second = asyncio.create_task(a.acquire())  # asserts 1, granted: 1 + 1 + 1 = 3
    await asyncio.sleep(0)
    a.release()  # its count asserts the claim on its way: 0 + 1
    await asyncio.sleep(0)
    assert port.ledger.counts() == {"a": 1, "b": 1}
    port.go.set()
    assert await second and port.ledger.counts() == {"a": 1, "b": 1} and a.held == 1


async def test_ledger_restart_is_healed_by_the_renewals() -> None:
    port = LocalLedger()
    a, b = SharedSlots(port, "a", 4), SharedSlots(port, "b", 4)
    for s in (a, a, b):
        assert await s.acquire()
    port.ledger = Ledger()  # a new, empty ledger
    await a.renew()
    await b.renew()
    assert port.ledger.counts() == {"a": 2, "b": 1}
    assert await b.acquire() and not await a.acquire()


async def test_unreachable_ledger_fails_open_to_a_local_share_then_recovers() -> None:
    port = LocalLedger()
    a, b = SharedSlots(port, "a", 5), SharedSlots(port, "b", 5)
    assert await a.acquire() and await b.acquire()
    await a.renew()  # a learns of b: a share is 5 // 2 = 2
    port.down = True
    assert [await a.acquire(), await a.acquire()] == [True, False]  # 2 held here: the share
    assert (a.ledger_up, a.num_fallbacks) == (False, 2)
    a.release()  # not sent (the ledger is away); the renewals assert the count later
    assert await a.acquire()
    await a.renew()  # still down: nothing changes
    assert not a.ledger_up
    port.down = False
    await a.renew()
    assert a.ledger_up and port.ledger.counts() == {"a": 2, "b": 1}
    # back on the ledger: the whole limit across both again
    assert [await a.acquire(), await b.acquire(), await b.acquire()] == [True, True, False]
    assert port.ledger.counts() == {"a": 3, "b": 2}


async def test_never_answered_ledger_falls_back_to_the_whole_limit() -> None:
    """A replica that never reached the ledger knows of no other replica: the old gate."""
    port = LocalLedger()
    port.down = True
    a = SharedSlots(port, "a", 2)
    assert [await a.acquire() for _ in range(3)] == [True, True, False]


async def test_slow_ledger_times_out_into_the_local_share() -> None:
    port = SlowPort()  # never answers
    a = SharedSlots(port, "a", 2, claim_timeout_s=0.01)
    assert await a.acquire()  # decided locally after the timeout
    assert not a.ledger_up and a.num_fallbacks == 1
    # the late claim was granted by the ledger, the renewal keeps the count as used
    assert port.ledger.counts() == {"a": 1}

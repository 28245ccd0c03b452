"""The token path between the serving replicas and the ingress: one message per engine step.

A Serve streaming call per request costs one message per token per stream on every hop, and on
the serving replica that work competes with the engine loop for the GIL. Here each ingress
replica owns a `TokenMailbox` actor. A serving replica gathers, per step, the outputs of every
request that came from one ingress replica and puts them into its mailbox in one call
(`MailboxSink`); the ingress takes whatever has arrived in one call and fans it out to the
requests' queues (`MailboxReader`). The per-request Serve call stays, for routing, cancellation
(the client went away: the call is cancelled and the request aborted), errors and failover,
but it carries only the request and its end.

Order: an async actor may run one sender's calls out of order (seen here: batch 3 before batch
2), so each sink numbers its batches and the mailbox hands a sender's batches out in that order,
holding any that arrive early. A request's outputs come from one sink, so they arrive in order;
its last output is put before its call returns.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from engine.metrics import Metrics
from serving.step_sink import StepSink
from serving.token_fanout import TokenReader

log = logging.getLogger(__name__)

# How often a sink asks whether its puts arrived, i.e. whether its mailbox is still there: a
# `ray.wait` took ~1 ms per call on a 2-core machine, on the step thread, between two steps.
CHECK_EVERY_S = 0.05


@ray.remote(num_cpus=0, max_restarts=-1)
class TokenMailbox:
    """Batches travel pickled (one `pickle.dumps` of the step's outputs by the sender): the
    mailbox only relays bytes, so it never pays to unpickle and pickle every output again."""

    def __init__(self) -> None:
        self._batches: list[bytes] = []
        self._ready = asyncio.Event()
        self._next: dict[str, int] = {}  # per sender: the number of the batch due next
        self._early: dict[str, dict[int, bytes]] = {}  # per sender: batches that came early

    async def put(self, sender: str, seq: int, batch: bytes) -> None:
        """Batch `seq` (0, 1, 2, ...) of `sender`; handed out after all its earlier ones."""
        early = self._early.setdefault(sender, {})
        early[seq] = batch
        due = self._next.get(sender, 0)
        while due in early:
            self._batches.append(early.pop(due))
            due += 1
        self._next[sender] = due
        if self._batches:
            self._ready.set()

    async def take(self) -> list[bytes]:
        """Every batch put since the last take, in order; waits while there is none."""
        await self._ready.wait()
        self._ready.clear()
        batches, self._batches = self._batches, []
        return batches


@dataclass(frozen=True)
class Mailbox:
    """The address a request carries: where its outputs go."""

    id: str
    actor: object  # a TokenMailbox handle


class MailboxReader(TokenReader):
    """The ingress side: owns a mailbox and fans what arrives out to the open requests."""

    def __init__(self) -> None:
        super().__init__()
        # On the ingress's own node: it then fails only with the ingress that reads it. Placed
        # anywhere, the loss of some other node would take every open stream of this ingress.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.mailbox = Mailbox(uuid.uuid4().hex,
                               TokenMailbox.options(scheduling_strategy=here).remote())

    async def _receive(self) -> None:
        while True:
            try:
                batches = await self.mailbox.actor.take.remote()
            except Exception as e:  # the mailbox restarts; the open requests fail over
                log.exception("token mailbox unreachable")
                self.fanout.fail(e)
                await asyncio.sleep(0.1)
                continue
            for batch in batches:
                self.fanout.deliver_batch(batch)


class MailboxSink(StepSink):
    """The serving replica's side for one mailbox: one `put` per step (serving/step_sink.py).

    If the mailbox is gone (its ingress replica died), nobody reads the requests' outputs: the
    sink is lost and aborts the requests still open on it. Whether puts arrived is checked at
    most every CHECK_EVERY_S."""

    def __init__(self, mailbox: Mailbox, metrics: Metrics,
                 on_lost: Callable[[list[str]], None]) -> None:
        super().__init__(metrics, on_lost)
        self.mailbox = mailbox
        self.sender, self.seq = uuid.uuid4().hex, 0
        self.in_flight: list[ray.ObjectRef] = []
        self._next_check = 0.0  # time.monotonic() of the next delivery check

    def send(self, blob: bytes) -> None:
        self.in_flight.append(self.mailbox.actor.put.remote(self.sender, self.seq, blob))
        self.seq += 1
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + CHECK_EVERY_S
            self._check_delivered()

    def _check_delivered(self) -> None:
        done, self.in_flight = ray.wait(self.in_flight, num_returns=len(self.in_flight),
                                        timeout=0)
        failed = False
        for ref in done:
            try:
                ray.get(ref)
            except Exception:
                failed = True
        if failed:
            log.warning("token mailbox %s is gone; aborting its %d requests",
                        self.mailbox.id[:8], len(self.recorders))
            self.mark_lost()

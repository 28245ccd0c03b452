"""The admission ledger's Ray side (serving/admission_ledger.py has the protocol): the named,
detached actor that holds the Ledger, the LedgerPort that reaches it, and the SharedSlots of the
Serve replica this runs in."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable
from typing import Any

from serving.admission_ledger import IDLE_EXIT_S, NAMESPACE, Ledger, SharedSlots

log = logging.getLogger(__name__)


class AdmissionLedgerActor:
    """The Ray actor around a Ledger (made remote in `RayLedger.lookup`). Plain, not async: one
    caller's calls run in the order sent. Detached, so that no single ingress replica's death
    takes it down; it ends itself once no holder has called for IDLE_EXIT_S (the app is gone)."""

    def __init__(self) -> None:
        self.ledger = Ledger()
        threading.Thread(target=self._exit_when_idle, daemon=True).start()

    def claim(self, holder: str, held: int, limit: int, want: int) -> tuple[int, int]:
        return self.ledger.claim(holder, held, limit, want)

    def renew(self, holder: str, held: int) -> int:
        return self.ledger.renew(holder, held)

    def counts(self) -> dict[str, int]:
        return self.ledger.counts()

    def _exit_when_idle(self) -> None:
        import ray

        while self.ledger.idle_s() < IDLE_EXIT_S:
            time.sleep(IDLE_EXIT_S / 4)
        log.info("admission ledger idle for %.0f s: ending", self.ledger.idle_s())
        ray.get_runtime_context().current_actor.__ray_terminate__.remote()


_remote_class: Any = None


class RayLedger:
    """LedgerPort over the named actor `name`, created by whichever holder comes first."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.actor: Any = None
        try:
            self.actor = self.lookup()
        except Exception:  # the renewals keep trying; meanwhile the local share admits
            log.exception("admission ledger %s: lookup failed", name)

    def lookup(self) -> Any:
        global _remote_class
        import ray  # here, not at the top: the API imports this module without Ray

        if _remote_class is None:
            _remote_class = ray.remote(num_cpus=0, max_restarts=0)(AdmissionLedgerActor)
        return _remote_class.options(name=self.name, namespace=NAMESPACE,
                                     get_if_exists=True, lifetime="detached").remote()

    def claim(self, holder: str, held: int, limit: int, want: int) -> Awaitable[tuple[int, int]]:
        if self.actor is None:  # lost: only a renewal looks it up again (see renew)
            raise ConnectionError(f"admission ledger {self.name} lost")
        return self._answer(self.actor.claim.remote(holder, held, limit, want))

    def renew(self, holder: str, held: int) -> Awaitable[int]:
        if self.actor is None:
            return self._found_then_renew(holder, held)
        return self._answer(self.actor.renew.remote(holder, held))

    def renew_nowait(self, holder: str, held: int) -> None:
        if self.actor is not None:  # else the next renewal asserts the count
            self.actor.renew.remote(holder, held)

    async def _found_then_renew(self, holder: str, held: int) -> int:
        # The holder's renewals run one at a time and no claim is sent while the ledger is
        # lost, so nothing overtakes this message. A blocking GCS lookup: off the event loop.
        actor = await asyncio.to_thread(self.lookup)
        self.actor = actor
        return await self._answer(actor.renew.remote(holder, held))

    async def _answer(self, ref: Any) -> Any:
        try:
            return await ref
        except Exception:
            self.actor = None  # dead or gone: the next renewal looks it up (or starts it)
            raise


def ledger_name(app: str, deployment: str) -> str:
    """The ledger actor's name, one per application and deployment. "-v2": claims carry
    `want`; a detached ledger of the one-slot protocol, left running by an earlier version of
    the app, is not reused (it ends itself when idle)."""
    return f"admission-v2:{app}:{deployment}"


def replica_shared_slots(limit: int) -> SharedSlots:
    """The SharedSlots of the Serve replica this runs in: one ledger per application and
    deployment, this replica its holder."""
    from ray import serve

    replica = serve.get_replica_context().replica_id
    dep = replica.deployment_id
    return SharedSlots(RayLedger(ledger_name(dep.app_name, dep.name)),
                       f"{dep.name}#{replica.unique_id}", limit)

"""PrefixAffinityRouter: a Ray Serve request router that sends a decode request to the replica
most likely holding its prompt's prefix pages, so shared prefixes are neither re-sent by
prefill nor stored twice (docs/routing.md).

Serve builds one router per deployment handle, in the caller's process (here: each ingress
replica's handle to `decode`), from the deployment's `request_router_config`. The decode methods
`run` and `generate` take the prompt token ids first; calls without them (`health`,
`check_integrity`) go to the least loaded replica. The choice itself is cluster/prefix_index.py.

Load is the number of requests in flight on a replica: the larger of what this router sent and
has not seen finish, and Serve's queue-length cache (which also counts other routers' requests,
as the replicas report them). Each rank returned to Serve is one replica, best first; a replica
at its `max_ongoing_requests` refuses and Serve tries the next, then backs off and asks again.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

from ray.serve._private.constants import SERVE_LOGGER_NAME
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import (
    PendingRequest,
    ReplicaID,
    ReplicaResult,
    RequestRouter,
    RunningReplica,
)

from cluster.prefix_index import PrefixIndex
from engine.config import EngineConfig
from serving.config import AppConfig, Role
from serving.control_config import RoutingSection

logger = logging.getLogger(SERVE_LOGGER_NAME)

ROUTER_CLASS = "cluster.prefix_router.PrefixAffinityRouter"
MAX_PENDING_HASHES = 10_000  # requests chosen for but not yet routed (see _hashes)
_ROUTING = RoutingSection.model_fields  # the defaults of `routing:`, written there once


def prompt_of(pending_request: PendingRequest | None) -> list[int] | None:
    """The prompt token ids of a decode call (its first argument), if it has them."""
    if pending_request is None or not pending_request.args:
        return None
    first = pending_request.args[0]
    if isinstance(first, list | tuple) and all(isinstance(t, int) for t in first[:8]):
        return list(first)
    return None


class PrefixAffinityRouter(RequestRouter):
    """No Locality/Multiplex/FIFO mixins: FIFO would hand the replica chosen for one request
    to whichever request waits longest, undoing the prefix match."""

    def initialize_state(self, page_size: int = EngineConfig.page_size,
                         max_imbalance: int = _ROUTING["max_imbalance"].default,
                         max_entries: int = _ROUTING["max_index_pages"].default,
                         **_: Any) -> None:
        self.index: PrefixIndex[ReplicaID] = PrefixIndex(page_size, max_entries, max_imbalance)
        self._in_flight: dict[ReplicaID, set[str]] = {}  # replica -> internal request ids
        self.num_routed = {"prefix": 0, "other": 0}  # calls with and without a prompt
        # A request's block hashes from `choose_replicas` until `on_request_routed` (both on
        # the ingress's event loop): its prompt is hashed once. Bounded: a request cancelled
        # before it was routed leaves its entry behind.
        self._hashes: OrderedDict[str, list[int]] = OrderedDict()
        logger.info("prefix-affine routing for %s: page_size %d, max_imbalance %d, %d index "
                    "pages", self._deployment_id, page_size, max_imbalance, max_entries)

    def _index(self) -> PrefixIndex[ReplicaID]:
        # Serve calls initialize_state with the config's kwargs; a router made without them
        # (tests, older Serve) still works with the defaults.
        if not hasattr(self, "index"):
            self.initialize_state()
        return self.index

    def loads(self, replicas: list[RunningReplica]) -> dict[ReplicaID, int]:
        loads = {}
        for r in replicas:
            mine = len(self._in_flight.get(r.replica_id, ()))
            cached = (self._replica_queue_len_cache.get(r.replica_id)
                      if self._use_replica_queue_len_cache else None)
            loads[r.replica_id] = max(mine, cached or 0)
        return loads

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is not None:
            # After every rank refused: sleep before asking again, not spin.
            pending_request.routing_context.should_backoff = True
        index = self._index()
        hashes = self._hashes_of(pending_request)
        by_id = {r.replica_id: r for r in candidate_replicas}
        ranked = index.rank(hashes, self.loads(candidate_replicas))
        if hashes:
            # Recorded now, not when the replica accepts: a burst of one new prefix then
            # follows its first request instead of spreading before that one is accepted.
            index.record(hashes, ranked[0])
        return [[by_id[rid]] for rid in ranked]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: ReplicaResult) -> None:
        request_id = pending_request.metadata.internal_request_id
        self._in_flight.setdefault(replica_id, set()).add(request_id)
        hashes = self._hashes.pop(request_id, None)
        if hashes is None:
            hashes = self._hashes_of(pending_request, keep=False)
        if hashes:
            self._index().record(hashes, replica_id)
        self.num_routed["prefix" if prompt_of(pending_request) else "other"] += 1

    def _hashes_of(self, pending_request: PendingRequest | None, keep: bool = True
                   ) -> list[int]:
        """The block hashes of the request's prompt ([] without one), computed once per
        request: kept (if `keep`) for `on_request_routed`."""
        if pending_request is None:
            return []
        request_id = pending_request.metadata.internal_request_id
        hashes = self._hashes.get(request_id)
        if hashes is None:
            prompt = prompt_of(pending_request)
            hashes = self._index().hashes(prompt) if prompt else []
            if keep:
                self._hashes[request_id] = hashes
                while len(self._hashes) > MAX_PENDING_HASHES:
                    self._hashes.popitem(last=False)
        return hashes

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        # Also called for requests a replica refused, which were never counted.
        self._in_flight.get(replica_id, set()).discard(internal_request_id)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self._forget_departed()

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._forget_departed()

    def _forget_departed(self) -> None:
        live = self._replica_id_set
        self._index().retain(live)
        for rid in [r for r in self._in_flight if r not in live]:
            del self._in_flight[rid]


def router_config(cfg: AppConfig, role: Role) -> RequestRouterConfig:
    """The `request_router_config` of the deployment the ingress calls, from `routing:`."""
    return RequestRouterConfig(request_router_class=ROUTER_CLASS, request_router_kwargs={
        "page_size": cfg.engine_config(role).page_size,
        "max_imbalance": cfg.routing.max_imbalance,
        "max_entries": cfg.routing.max_index_pages})

"""Prefix-affine routing: which decode replica each prompt goes to (cluster/prefix_index.py),
exactly; and the Serve router built from Ray's own RequestRouter machinery with stand-in
replicas (cluster/prefix_router.py), so the ranks, the refusal fall-through and the lifecycle
hooks are exercised the way Serve calls them. No cluster, no timing."""

from __future__ import annotations

import asyncio

import pytest

from cluster.prefix_index import MAX_HOLDERS, PrefixIndex
from engine.block_hash import block_hashes

PAGE = 4


def prompt(prefix: int, pages: int, suffix: int = 0, tail: int = 0) -> list[int]:
    """`pages` full pages of the shared prefix `prefix`, then `suffix` own pages of id `tail`
    (different tails give different suffixes)."""
    return [1000 * prefix + i for i in range(pages * PAGE)] + [7000 + tail] * (suffix * PAGE)


def route(index: PrefixIndex, ids: list[int], loads: dict[str, int]) -> str:
    """What the router does per request: rank, send to the first, record it."""
    hashes = index.hashes(ids)
    chosen = index.rank(hashes, loads)[0]
    index.record(hashes, chosen)
    return chosen


def test_hashes_are_the_engines_chain_hashes_of_full_pages():
    index = PrefixIndex(PAGE)
    ids = prompt(1, 3) + [5, 6]  # the partial last page is not hashed
    assert index.hashes(ids) == block_hashes(ids, PAGE) and len(index.hashes(ids)) == 3


def test_a_prefix_goes_back_to_the_replica_it_was_sent_to():
    index = PrefixIndex(PAGE)
    loads = {"a": 0, "b": 0}
    assert route(index, prompt(1, 4, 1, tail=1), loads) == "a"  # no match: name breaks the tie
    # A new prefix, equal loads: the replica with fewer recorded pages takes it.
    assert route(index, prompt(2, 4, 1, tail=2), loads) == "b"
    for tail in range(3, 8):
        assert route(index, prompt(1, 4, 1, tail=tail), loads) == "a"
        assert route(index, prompt(2, 4, 1, tail=tail), loads) == "b"


def test_the_longest_match_wins_and_equal_matches_go_by_load():
    index = PrefixIndex(PAGE)
    index.record(index.hashes(prompt(1, 2)), "a")
    index.record(index.hashes(prompt(1, 5)), "b")
    hashes = index.hashes(prompt(1, 6))
    assert index.matches(hashes, ["a", "b", "c"]) == {"a": 2, "b": 5, "c": 0}
    assert index.rank(hashes, {"a": 0, "b": 3, "c": 0}) == ["b", "a", "c"]  # then by load, match
    # Only the two shared pages: a and b match equally, the lighter one wins.
    short = index.hashes(prompt(1, 2, 1))
    assert index.rank(short, {"a": 2, "b": 1, "c": 0})[0] == "b"


def test_past_the_bound_the_least_loaded_replica_takes_it():
    index = PrefixIndex(PAGE, max_imbalance=2)
    hashes = index.hashes(prompt(1, 4))
    index.record(hashes, "a")
    assert index.rank(hashes, {"a": 2, "b": 0})[0] == "a"  # at the bound: still affine
    assert index.rank(hashes, {"a": 3, "b": 0}) == ["b", "a"]  # past it: fall back
    assert index.rank(hashes, {"a": 3, "b": 1, "c": 0})[0] == "c"


def test_a_hot_prefix_spreads_over_replicas_instead_of_piling_on_one():
    index = PrefixIndex(PAGE, max_imbalance=2)
    loads = {"a": 0, "b": 0, "c": 0}
    sent = []
    for tail in range(12):  # 12 concurrent requests of one prefix, none finishing
        r = route(index, prompt(1, 4, 1, tail=tail), loads)
        loads[r] += 1
        sent.append(r)
    # a takes it until 2 ahead of the others, then b (now a holder too), then c; then by load.
    assert sent == ["a", "a", "a", "b", "b", "b", "c", "c", "c", "a", "b", "c"]
    # Each replica that took an overflow is now a holder: the prefix stays on those three.
    assert index.matches(index.hashes(prompt(1, 4)), loads) == {"a": 4, "b": 4, "c": 4}


def test_a_removed_replica_is_forgotten_and_its_prefixes_move_once():
    index = PrefixIndex(PAGE)
    loads = {"a": 0, "b": 0}
    assert route(index, prompt(1, 4), loads) == "a"
    assert route(index, prompt(2, 4), loads) == "b"
    index.retain(["b", "c"])  # a left, c joined
    assert index.entries("a") == 0 and index.entries("b") == 4
    loads = {"b": 0, "c": 0}
    assert index.matches(index.hashes(prompt(1, 4)), loads) == {"b": 0, "c": 0}
    assert route(index, prompt(1, 4), loads) == "c"  # the fresh replica draws it (fewer pages)
    assert route(index, prompt(1, 4, 1), {"b": 0, "c": 1}) == "c"
    assert route(index, prompt(2, 4), loads) == "b"


def test_the_index_is_bounded_and_forgets_deep_pages_of_old_prompts_first():
    index = PrefixIndex(PAGE, max_entries=6)
    index.record(index.hashes(prompt(1, 4)), "a")
    index.record(index.hashes(prompt(2, 4)), "b")
    assert len(index) == 6
    assert index.entries("a") == 2 and index.entries("b") == 4
    # a's first two pages survive: its prompts still find it, for a shorter match.
    assert index.matches(index.hashes(prompt(1, 4)), ["a"]) == {"a": 2}


def test_a_page_remembers_at_most_max_holders_replicas():
    index = PrefixIndex(PAGE)
    hashes = index.hashes(prompt(1, 1))
    names = [f"r{i}" for i in range(MAX_HOLDERS + 1)]
    for r in names:
        index.record(hashes, r)
    assert index.matches(hashes, names)[names[0]] == 0
    assert index.entries(names[0]) == 0 and index.entries(names[-1]) == 1


def test_a_prompt_shorter_than_a_page_goes_by_load():
    index = PrefixIndex(PAGE)
    assert index.hashes([1, 2, 3]) == []
    assert index.rank([], {"a": 3, "b": 1}) == ["b", "a"]
    assert index.rank([], {}) == []


# --- the Serve router, on Ray's RequestRouter with stand-in replicas ---------------------------

serve_router = pytest.importorskip("ray.serve.request_router")


class FakeReplica:
    """What RequestRouter reads of a RunningReplica; `queue_len` answers its probes."""

    def __init__(self, name: str, max_ongoing_requests: int = 8) -> None:
        from ray.serve._private.common import DeploymentID, ReplicaID
        self.replica_id = ReplicaID(name, DeploymentID(name="decode", app_name="t"))
        self.max_ongoing_requests = max_ongoing_requests
        self.queue_len = 0
        self.node_id, self.availability_zone, self.multiplexed_model_ids = "", None, set()
        self.is_cross_language = False

    async def get_queue_len(self, *, deadline_s: float) -> int:
        return self.queue_len


def make_router(replicas: list[FakeReplica], **kwargs):
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID

    from cluster.prefix_router import PrefixAffinityRouter
    router = PrefixAffinityRouter(DeploymentID(name="decode", app_name="t"),
                                  DeploymentHandleSource.UNKNOWN)
    router.initialize_state(page_size=PAGE, **kwargs)
    router.update_replicas(replicas)
    return router


def pending(ids, n: int):
    from ray.serve._private.common import RequestMetadata
    from ray.serve.request_router import PendingRequest
    meta = RequestMetadata(request_id=f"r{n}", internal_request_id=f"i{n}", call_method="run")
    return PendingRequest(args=[ids, None, f"r{n}", None], kwargs={}, metadata=meta)


async def send(router, pr):
    """Serve's path for one request: choose (through its routing tasks), then `routed`."""
    replica = await asyncio.wait_for(router._choose_replica_for_request(pr), 10)
    router.on_request_routed(pr, replica.replica_id, None)
    return replica.replica_id.unique_id


def test_the_serve_router_routes_by_prefix_and_falls_through_a_full_replica():
    async def scenario():
        a, b = FakeReplica("a"), FakeReplica("b")
        router = make_router([a, b], max_imbalance=1)
        got = [await send(router, pending(prompt(1, 4, 1, tail=0), 0)),
               await send(router, pending(prompt(2, 4, 1, tail=1), 1)),
               await send(router, pending(prompt(1, 4, 1, tail=2), 2))]
        assert got == ["a", "b", "a"]
        assert router.num_routed == {"prefix": 3, "other": 0}
        assert router.loads([a, b]) == {a.replica_id: 2, b.replica_id: 1}
        # a is now 1 ahead of b; one more makes it 2: past max_imbalance=1 -> b.
        router.on_request_completed(b.replica_id, "i1")
        assert await send(router, pending(prompt(1, 4, 1, tail=3), 3)) == "b"
        # a refuses (its queue is full): Serve falls through to the next rank.
        a.max_ongoing_requests = 2
        router.on_request_completed(b.replica_id, "i3")
        assert await send(router, pending(prompt(1, 4, 1, tail=4), 4)) == "b"
        # A call without a prompt (health) goes by load.
        health = pending(None, 5)
        health.args = []
        assert await send(router, health) == "b"
        assert router.num_routed["other"] == 1

    asyncio.run(scenario())


def test_the_serve_router_forgets_a_replica_that_leaves():
    async def scenario():
        a, b = FakeReplica("a"), FakeReplica("b")
        router = make_router([a, b])
        assert await send(router, pending(prompt(1, 4), 0)) == "a"
        router.on_replica_actor_died(a.replica_id)
        assert router.index.entries(a.replica_id) == 0 and a.replica_id not in router._in_flight
        assert await send(router, pending(prompt(1, 4), 1)) == "b"
        c = FakeReplica("c")
        router.update_replicas([b, c])
        assert await send(router, pending(prompt(1, 4, 1), 2)) == "b"  # b holds it now
        assert await send(router, pending(prompt(3, 4), 3)) == "c"  # new prefix: the fresh one

    asyncio.run(scenario())


def test_build_app_gives_the_decode_deployment_the_router_only_when_asked():
    from cluster.app import role_options
    from cluster.prefix_router import ROUTER_CLASS
    from serving.config import AppConfig
    default = AppConfig.from_args({})
    assert "request_router_config" not in role_options(default, "decode")
    cfg = AppConfig.from_args({"routing": {"policy": "prefix", "max_imbalance": 2},
                               "decode": {"engine": {"page_size": 32}}})
    assert "request_router_config" not in role_options(cfg, "prefill")
    rc = role_options(cfg, "decode")["request_router_config"]
    assert rc.request_router_class == ROUTER_CLASS
    assert rc.request_router_kwargs == {"page_size": 32, "max_imbalance": 2,
                                        "max_entries": 200_000}
    assert rc.get_request_router_class().__name__ == "PrefixAffinityRouter"
    colocated = AppConfig.from_args({"mode": "colocated", "routing": {"policy": "prefix"}})
    assert role_options(colocated, "colocated")["request_router_config"].request_router_kwargs[
        "page_size"] == 16


def test_the_serve_router_hashes_each_prompt_once():
    async def scenario():
        a, b = FakeReplica("a"), FakeReplica("b")
        router = make_router([a, b])
        calls = []
        hashes = router.index.hashes
        router.index.hashes = lambda ids: calls.append(len(ids)) or hashes(ids)
        assert await send(router, pending(prompt(1, 4), 0)) == "a"
        assert await send(router, pending(prompt(1, 4, 1), 1)) == "a"
        assert len(calls) == 2 and router._hashes == {}  # once per request, none left over

    asyncio.run(scenario())

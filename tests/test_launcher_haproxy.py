"""The launcher waits, behind Serve's HAProxy, until HAProxy routes to an ingress replica itself
(not to its fallback, Serve's Python proxy): bench/launcher.py, `wait_routed`."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from bench.launcher import ServerProcess, haproxy_admin_socket, routes_to_replica

HEADER = ("1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight "
          "srv_iweight srv_time_since_last_change srv_check_status\n")
FALLBACK_ONLY = HEADER + (  # as Serve 2.60's HAProxy lists it before the switch
    "5 http-pdserve 1 SERVE_PROXY_ACTOR-fallback-51df 127.0.0.1 2 0 1 1 96 15\n"
    "7 grpc_fallback_backend 1 SERVE_PROXY_ACTOR-fallback-51df 127.0.0.1 2 0 1 1 101 15\n")
REPLICA_UP = HEADER + (
    "5 http-pdserve 1 SERVE_REPLICA_pdserve-ingress-3p4d 127.0.0.1 2 0 1 1 87 15\n"
    "5 http-pdserve 2 SERVE_PROXY_ACTOR-fallback-51df 127.0.0.1 2 0 1 1 96 15\n")


def test_only_an_up_replica_of_an_http_backend_counts_as_routed() -> None:
    assert not routes_to_replica(FALLBACK_ONLY)
    assert routes_to_replica(REPLICA_UP)
    assert not routes_to_replica(REPLICA_UP.replace("127.0.0.1 2 0 1 1 87", "127.0.0.1 0 0 1 1 87"))
    assert not routes_to_replica(REPLICA_UP.replace("http-pdserve", "grpc-pdserve"))
    assert not routes_to_replica("")


class FakeAdminSocket:
    """Answers `show servers state` like HAProxy: the fallback only for the first
    `switch_after` questions, then the replica too. Records the commands it got."""

    def __init__(self, path: Path, switch_after: int) -> None:
        self.commands: list[str] = []
        self.switch_after = switch_after
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return  # closed
            with conn:
                self.commands.append(conn.recv(1024).decode())
                routed = len(self.commands) > self.switch_after
                conn.sendall((REPLICA_UP if routed else FALLBACK_ONLY).encode())


def test_wait_routed_asks_until_the_replica_is_listed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_SERVE_HAPROXY_SOCKET_PATH", str(tmp_path / "admin.sock"))
    server = ServerProcess(["true"], "http://127.0.0.1:9/health", tmp_path / "x.log")
    server.started_at = time.time() - 1
    (tmp_path / "node-a").mkdir()
    fake = FakeAdminSocket(tmp_path / "node-a" / "admin.sock", switch_after=3)
    try:
        assert haproxy_admin_socket(server.started_at) == tmp_path / "node-a" / "admin.sock"
        assert server.wait_routed(timeout=30, interval=0.01)
        assert fake.commands == ["show servers state\n"] * 4
        fake.switch_after = 10**6  # never routed again: the wait gives up at its timeout
        assert not server.wait_routed(timeout=0.2, interval=0.01)
    finally:
        fake.server.close()


def test_no_admin_socket_made_since_the_start_means_no_wait(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_SERVE_HAPROXY_SOCKET_PATH", str(tmp_path / "admin.sock"))
    (tmp_path / "old-node").mkdir()
    stale = tmp_path / "old-node" / "admin.sock"
    stale.touch()  # an earlier cluster's, nothing listens
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    server = ServerProcess(["true"], "http://127.0.0.1:9/health", tmp_path / "x.log")
    server.started_at = time.time()
    assert haproxy_admin_socket(server.started_at) is None
    assert server.wait_routed(timeout=0)

"""A free TCP port for a server a test or benchmark starts (the Serve proxy, a gRPC port)."""

from __future__ import annotations

import random
import socket


def free_port() -> int:
    """A free port below the kernel's ephemeral range (32768+) and above Ray's worker ports
    (10002-19999): an ephemeral port free now can be taken by one of the processes Ray starts
    before the Serve proxy binds it (seen once: "Failed to bind to address")."""
    for port in random.Random().sample(range(20000, 32000), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32000")

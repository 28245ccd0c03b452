"""Runs last (file order): after every other end-to-end test, no replica holds a KV page."""

from __future__ import annotations

import time

import httpx


def _used_pages(base: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics", timeout=30).text
    return {line.split("{", 1)[1].split("}", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line.startswith("pdserve_kv_pages_used{")}


def test_every_replica_reports_zero_pages_used(cluster):
    deadline = time.time() + 15
    while True:
        used = _used_pages(cluster["base"])
        roles = {k.split('role="', 1)[1].split('"', 1)[0] for k in used}
        if roles >= {"prefill", "decode", "colocated"} and not any(used.values()):
            break
        assert time.time() < deadline, f"pages still used: {used}"
        time.sleep(0.5)

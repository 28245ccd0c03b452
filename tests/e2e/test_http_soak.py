"""A small soak (bench/soak.py) against the shared cluster: 100 requests, 20% dropped by the
client, 5% invalid: no failure, every replica back to zero pages, allocators sound, none
restarted. `python -m bench.soak` runs the full-size one against any URL."""

from __future__ import annotations

import asyncio

from bench.soak import run_soak


def test_soak_100_requests(cluster):
    report = asyncio.run(run_soak(cluster["base"], requests=100, concurrency=8, max_tokens=16,
                                  timeout=60, settle=20, seed=1))
    print(f"\nsoak: {report}")
    assert report["passed"], report
    outcomes = report["outcomes"]
    aborted = sum(n for k, n in outcomes.items() if k.startswith("aborted"))
    assert aborted > 5 and outcomes.get("invalid_4xx", 0) > 0

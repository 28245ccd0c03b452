"""A burst of admissions through the cluster-wide admission ledger (a Ray actor), as two ingress
replicas would send it: how long until every request has its answer.

    RAY_ADDRESS=local python -m bench.admission_burst [--burst 128] [--holders 2] [--repeats 3]

Starts a local Ray, the ledger actor (serving/ledger_actor.py) and one `SharedSlots` per
holder, then, per repeat, `--burst` concurrent acquires spread over the holders (limit = burst,
so every one is granted), and prints the time until all are answered, the p50/p99 of one
acquire, and the claim messages each holder sent. Then all slots are released.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from bench.stats import percentile


async def run(burst: int, holders: int, repeats: int) -> None:
    from serving.admission_ledger import SharedSlots
    from serving.ledger_actor import RayLedger

    port = RayLedger(f"bench-admission-burst-{time.time_ns()}")
    slots = [SharedSlots(port, f"h{i}", burst) for i in range(holders)]
    for s in slots:
        await s.renew()
    for rep in range(repeats):
        claims = [s.num_claims for s in slots]
        waits: list[float] = []

        async def one(s: SharedSlots, waits: list[float]) -> bool:
            t = time.perf_counter()
            ok = await s.acquire()
            waits.append(1e3 * (time.perf_counter() - t))
            return ok

        start = time.perf_counter()
        got = await asyncio.gather(*[one(slots[i % holders], waits) for i in range(burst)])
        total = 1e3 * (time.perf_counter() - start)
        sent = [s.num_claims - c for s, c in zip(slots, claims)]
        print(f"burst {rep}: {sum(got)}/{burst} granted in {total:.0f} ms; one acquire p50 "
              f"{percentile(waits, 50):.1f} ms, p99 {percentile(waits, 99):.1f} ms; claim "
              f"messages per holder {sent}", flush=True)
        for s in slots:
            for _ in range(s.held):
                s.release()
        await asyncio.sleep(0.5)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--burst", type=int, default=128)
    ap.add_argument("--holders", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    import ray

    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        asyncio.run(run(args.burst, args.holders, args.repeats))
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()

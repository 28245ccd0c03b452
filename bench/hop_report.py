"""Reads the hop logs of a serving run (engine/hop_log.py) and prints, per wave, when the wave's
requests passed each hop and how long each hop took.

    python -m bench.hop_report DIR --client SERVE.json [--concurrency N] [--span FROM TO ...]

DIR holds every process's `hops-<pid>.jsonl` (a run with PDSERVE_HOP_LOG=DIR). `SERVE.json` is
`bench.serve`'s output of the run: its `start_unix` is time 0, and only requests that reached
the ingress within its `duration_s` count (the warm-up's come before, other runs' before or
after). Requests are grouped into waves of N (the run's concurrency) in the order they reached
the ingress, as `bench.waves` groups sends. Each wave's table has a row per hop, ordered by its
median time: p10 / p50 / p90 / max of the time the wave's requests passed it (s from the
start), and `hop p50`: the median over requests of the time from the row above (ms), what
that hop took. Two rows are paired by order, not by id:
`client.send` (the client's k-th send) and `ingress.http` (the k-th HTTP request to reach an
ingress replica's app, logged under its X-Request-Id, before the route names the engine's
request) go with the k-th request to reach `ingress.call`. A prefill call that a decode
replica made again (`<id>-again`, decode/worker.py) counts as its request's: its hops replace
those of the call it replaced.

`--span FROM TO` (repeatable) adds, per wave, the median over requests of the time from hop
FROM to hop TO: the way between two hops that are not neighbours in the table (whose `hop p50`
rows each end at their own row), or that two runs order differently.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from bench.stats import percentile

Hops = dict[str, float]  # hop name -> when the request passed it (unix s), first pass only
AGAIN = "-again"  # the id suffix of a prefill call made again (decode/worker.py)


def read_hops(where: Path) -> dict[str, Hops]:
    """Every request's hops from all the hop files in `where`."""
    reqs: dict[str, Hops] = defaultdict(dict)
    for path in sorted(where.glob("hops-*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                reqs[r["id"]].setdefault(r["hop"], r["t"])
    for again in [rid for rid in reqs if rid.endswith(AGAIN)]:
        reqs[again.removesuffix(AGAIN)].update(reqs.pop(again))
    return dict(reqs)


def first_hop(path: Hops) -> float:
    return path.get("ingress.call", min(path.values()))


def wave_table(wave: list[Hops], t0: float) -> list[tuple[str, list[float], float | None]]:
    """(hop, [p10, p50, p90, max] s from t0, median ms since the hop before) per hop, by median
    time; the first row's step is None."""
    names = {name for path in wave for name in path}
    times = {name: [p[name] - t0 for p in wave if name in p] for name in names}
    order = sorted(names, key=lambda n: percentile(times[n], 50))
    rows = []
    for i, name in enumerate(order):
        qs = [percentile(times[name], q) for q in (10, 50, 90)] + [max(times[name])]
        prev = order[i - 1] if i else None
        steps = [1e3 * (p[name] - p[prev]) for p in wave if prev and name in p and prev in p]
        rows.append((name, qs, percentile(steps, 50) if steps else None))
    return rows


def span_ms(wave: list[Hops], src: str, dst: str) -> tuple[float, int] | None:
    """(median ms from hop `src` to hop `dst`, requests that passed both), None if none did."""
    times = [1e3 * (p[dst] - p[src]) for p in wave if src in p and dst in p]
    return (percentile(times, 50), len(times)) if times else None


def report(reqs: dict[str, Hops], start_unix: float, duration_s: float, sends_s: list[float],
           concurrency: int, spans: list[tuple[str, str]] = ()) -> list[str]:
    def in_run(t: float) -> bool:
        return start_unix <= t <= start_unix + duration_s

    http = sorted(t for p in reqs.values() if set(p) == {"ingress.http"}
                  and in_run(t := p["ingress.http"]))
    run = sorted((dict(p) for p in reqs.values() if set(p) != {"ingress.http"}
                  and in_run(first_hop(p))), key=first_hop)  # copies: the pairs go in below
    for path, send, arrival in zip(run, sorted(sends_s), http):
        path["client.send"], path["ingress.http"] = start_unix + send, arrival
    lines = []
    for k in range(0, len(run), concurrency):
        wave = run[k:k + concurrency]
        lines.append(f"wave {k // concurrency + 1}: {len(wave)} requests")
        lines.append(f"  {'hop':<22} {'p10':>7} {'p50':>7} {'p90':>7} {'max':>7}   hop p50")
        for name, qs, step in wave_table(wave, start_unix):
            cell = "" if step is None else f"{step:8.1f} ms"
            lines.append(f"  {name:<22} " + " ".join(f"{q:7.3f}" for q in qs) + f"   {cell}")
        for src, dst in spans:
            got = span_ms(wave, src, dst)
            lines.append(f"  span {src} -> {dst}: " + (
                "no request passed both" if got is None
                else f"p50 {got[0]:.1f} ms ({got[1]} requests)"))
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("hop_dir", type=Path)
    ap.add_argument("--client", type=Path, required=True, help="bench.serve's JSON of the run")
    ap.add_argument("--concurrency", type=int, help="default: the run's own")
    ap.add_argument("--span", nargs=2, action="append", default=[], metavar=("FROM", "TO"),
                    help="also print each wave's median time from hop FROM to hop TO")
    args = ap.parse_args(argv)
    client = json.loads(args.client.read_text())["runs"][0]
    n = args.concurrency or client.get("concurrency") or len(client["requests"])
    sends = [r["send_s"] for r in client["requests"]]
    print("\n".join(report(read_hops(args.hop_dir), client["start_unix"], client["duration_s"],
                            sends, n, [tuple(s) for s in args.span])))


if __name__ == "__main__":
    main()

"""A closed-loop run seen as waves: when each wave's requests were sent, got their first token
and ended, in seconds from the run's start.

    python -m bench.waves SERVE.json [--concurrency N]

`SERVE.json` is `bench.serve`'s (or `bench.compare`'s) output for one configuration; every run
in it is printed. With N clients and every prompt and output of one length, the first N
requests go at once and each later one replaces a finished one, so the k-th group of N sends
(in send order) is wave k. Where a wave's first tokens and ends bunch together the waves ran
one after another (a prefill phase, then a decode phase); where they spread, the next wave's
prompts ran beside the last one's decode (docs/benchmarks.md, run 132).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.stats import percentile


def waves(requests: list[dict], concurrency: int) -> list[dict[str, float]]:
    """Per wave of `concurrency` requests in send order: the first and last send, and the
    p10 / p50 / p90 / max of first-token and end times (s from the run's start)."""
    reqs = sorted(requests, key=lambda r: r["send_s"])
    out = []
    for i in range(0, len(reqs), concurrency):
        wave = reqs[i:i + concurrency]
        first = [r["send_s"] + r["ttft_ms"] / 1e3 for r in wave]
        end = [r["send_s"] + r["e2e_ms"] / 1e3 for r in wave]
        row = {"requests": len(wave), "send_first": wave[0]["send_s"],
               "send_last": wave[-1]["send_s"]}
        for name, xs in (("first_token", first), ("end", end)):
            for q in (10, 50, 90):
                row[f"{name}_p{q}"] = percentile(xs, q)
            row[f"{name}_max"] = max(xs)
        out.append(row)
    return out


def format_wave(k: int, w: dict[str, float]) -> str:
    def span(name: str) -> str:
        return "/".join(f"{w[f'{name}_{q}']:.2f}" for q in ("p10", "p50", "p90", "max"))

    return (f"  wave {k}: {w['requests']:.0f} requests sent {w['send_first']:.2f}-"
            f"{w['send_last']:.2f} s; first token p10/p50/p90/max {span('first_token')} s; "
            f"end {span('end')} s")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("serve_json", type=Path)
    ap.add_argument("--concurrency", type=int, help="default: the run's own")
    args = ap.parse_args(argv)
    for run in json.loads(args.serve_json.read_text())["runs"]:
        n = args.concurrency or run.get("concurrency")
        name = run.get("label") or args.serve_json.stem
        if not n:  # requests sent at a rate: no client waits for another's end
            print(f"{name}: not a closed loop (no concurrency), no waves")
            continue
        ok = [r for r in run["requests"] if not r.get("error")]
        print(f"{name}, concurrency {n}: "
              f"{run['output_throughput']:.0f} tok/s in {run['duration_s']:.2f} s")
        for k, w in enumerate(waves(ok, n), 1):
            print(format_wave(k, w))


if __name__ == "__main__":
    main()

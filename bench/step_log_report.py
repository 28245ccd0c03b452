"""Reads a step log (engine/step_log.py) and prints the timeline of one run: when requests
reached the engine, the steps that ran prompt tokens, and the decode steps with rows missing.

    python -m bench.step_log_report STEPS.jsonl [--run -1] [--gap-s 0.25] [--full 128]
        [--client SERVE.json]

A log holds every run of its replica (warm-ups included); runs are separated by an idle gap of
more than `--gap-s`, and `--run` picks one (default: the last). `--full` is the batch a step
counts as full at (the benchmark's concurrency). `--client` takes `bench.serve`'s JSON of the
same run (its `start_unix` lines the two clocks up, same host) and adds how long requests took
from the client's send to the engine: the k-th send against the k-th action applied. That is
one action per request on a colocated or prefill replica (its add); a decode replica of 1P1D
applies two (the page reservation, then the admission after the KV import), so read the
prefill replica's log there.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def runs(lines: list[dict], gap_s: float) -> list[list[dict]]:
    """The log split where a round starts more than gap_s after the previous one ended."""
    out: list[list[dict]] = [[]]
    for prev, cur in zip([None, *lines], lines):
        if prev is not None and cur["t"] - (prev["t"] + prev["step_s"]) > gap_s:
            out.append([])
        out[-1].append(cur)
    return out


def report(run: list[dict], full: int) -> list[str]:
    t0 = run[0]["t"]
    end = run[-1]["t"] + run[-1]["step_s"] - t0
    rows = sum(r["decode"] for r in run)
    lines = [f"{len(run)} steps in {end:.3f} s; {rows / len(run):.1f} decode rows per step; "
             f"{sum(r['actions'] for r in run)} actions applied", time_split(run)]
    short = 0
    for i, r in enumerate(run):
        if r["actions"] or r["prefill"]:
            if short:
                lines.append(f"  ... {short} decode steps below {full} rows")
                short = 0
            lines.append(f"  step {i:4d} at {r['t'] - t0:7.3f} s: {r['actions']:3d} actions, "
                         f"{r['prefill']:5d} prompt tokens, {r['decode']:3d} decode rows, "
                         f"{r['waiting']:3d} left waiting, {1e3 * r['step_s']:6.1f} ms"
                         + costs(r))
        elif r["decode"] < full:
            short += 1
    if short:
        lines.append(f"  ... {short} decode steps below {full} rows")
    return lines


def costs(step: dict) -> str:
    """The step's own CPU time and the GC time in it, where the log has them (logs written
    before they were recorded do not)."""
    if "cpu_s" not in step:
        return ""
    return f" (cpu {1e3 * step['cpu_s']:.1f}, gc {1e3 * step['gc_s']:.1f})"


def time_split(run: list[dict]) -> str:
    """Where a run's time went: decode-only steps, steps with prompt tokens, and the gaps
    between steps (the replica's own work outside `Engine.step`). With overlapped scheduling a
    step's time is mostly the GPU time of the step launched before it."""
    decode = sorted(r["step_s"] for r in run if not r["prefill"])
    prompt = [r["step_s"] for r in run if r["prefill"]]
    gaps = sorted(max(0.0, b["t"] - a["t"] - a["step_s"]) for a, b in zip(run, run[1:]))

    def median_ms(xs: list[float]) -> float:
        return 1e3 * xs[len(xs) // 2] if xs else 0.0

    line = (f"  time: {len(decode)} decode-only steps {sum(decode):.3f} s (median "
            f"{median_ms(decode):.2f} ms), {len(prompt)} steps with prompt tokens "
            f"{sum(prompt):.3f} s, between steps {sum(gaps):.3f} s "
            f"(median {median_ms(gaps):.2f} ms)")
    if all("cpu_s" in r for r in run):
        line += (f"; in steps: cpu {sum(r['cpu_s'] for r in run):.3f} s, "
                 f"gc {sum(r['gc_s'] for r in run):.3f} s")
    timed = [r["device_s"] for r in run if "device_s" in r]
    if timed:  # on a GPU: the share of the run the device spent in steps
        span = run[-1]["t"] + run[-1]["step_s"] - run[0]["t"]
        line += f"; device time of the steps {sum(timed):.3f} s of {span:.3f} s"
    return line


def request_path_ms(run: list[dict], sends_unix: list[float]) -> list[float]:
    """k-th action applied minus k-th send, ms, for as many as both have."""
    applied = sorted(r["t"] for r in run for _ in range(r["actions"]))
    return [1e3 * (a - s) for a, s in zip(applied, sorted(sends_unix))]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("log", type=Path)
    ap.add_argument("--run", type=int, default=-1)
    ap.add_argument("--gap-s", type=float, default=0.25)
    ap.add_argument("--full", type=int, default=128)
    ap.add_argument("--client", type=Path)
    args = ap.parse_args(argv)
    lines = [json.loads(line) for line in args.log.read_text().splitlines() if line]
    all_runs = runs(lines, args.gap_s)
    print(f"{len(all_runs)} runs in {args.log}; run {args.run}:")
    print("\n".join(report(all_runs[args.run], args.full)))
    if args.client:
        from bench.stats import percentile

        client = json.loads(args.client.read_text())["runs"][0]
        if "start_unix" not in client:
            raise SystemExit(f"{args.client} has no start_unix (written before bench.serve "
                             "recorded it): its sends cannot be lined up with the step log")
        lat = request_path_ms(all_runs[args.run],
                              [client["start_unix"] + r["send_s"] for r in client["requests"]])
        print(f"client send -> applied in the engine, {len(lat)} requests: p50 "
              f"{percentile(lat, 50):.1f} ms, p99 {percentile(lat, 99):.1f} ms, "
              f"max {max(lat):.1f} ms")


if __name__ == "__main__":
    main()

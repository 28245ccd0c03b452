"""A closed-loop run seen as waves: when each wave's requests were sent, got their first token
and ended, in seconds from the run's start.

    python -m bench.waves SERVE.json [--concurrency N]

`SERVE.json` is `bench.serve`'s (or `bench.compare`'s) output for one configuration; every run
in it is printed. With N clients and every prompt and output of one length, the first N
requests go at once and each later one replaces a finished one, so the k-th group of N sends
(in send order) is wave k. Where a wave's first tokens and ends bunch together the waves ran
one after another (a prefill phase, then a decode phase); where they spread, the next wave's
prompts ran beside the last one's decode (docs/benchmarks.md, run 132).

Where the requests carry their `output_tokens`, each wave also gives its **decode pace**: the
median time per token after the first of the requests whose first token came last (within
`LAST_S` of the wave's last one). Those requests decode in a full batch from their first token
to their end, so the pace is the serving replica's step as the clients see it, to set against
the engine alone's decode-only step (docs/benchmarks.md, runs 150-152). It also holds what
comes between their first tokens and the batch's steady steps: for 1P1D on one H100, ~30-40 ms
a wave (11.3 ms a token against 11.0 ms steps on the device, run 154).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.stats import percentile

LAST_S = 0.05  # the wave's last first tokens: within this of the latest one


def decode_pace_ms(wave: list[dict]) -> float | None:
    """Median ms per token after the first, of the requests whose first token came within
    LAST_S of the wave's last first token; None without output token counts."""
    if not all(r.get("output_tokens", 0) > 1 for r in wave):
        return None
    first = [r["send_s"] + r["ttft_ms"] / 1e3 for r in wave]
    last = max(first)
    return percentile([(r["e2e_ms"] - r["ttft_ms"]) / (r["output_tokens"] - 1)
                       for r, t in zip(wave, first, strict=True) if t >= last - LAST_S], 50)


def waves(requests: list[dict], concurrency: int) -> list[dict[str, float]]:
    """Per wave of `concurrency` requests in send order: the first and last send, the
    p10 / p50 / p90 / max of first-token and end times (s from the run's start) and, where the
    requests carry their output token counts, `decode_pace_ms`."""
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
        if (pace := decode_pace_ms(wave)) is not None:
            row["decode_pace_ms"] = pace
        out.append(row)
    return out


def format_wave(k: int, w: dict[str, float]) -> str:
    def span(name: str) -> str:
        return "/".join(f"{w[f'{name}_{q}']:.2f}" for q in ("p10", "p50", "p90", "max"))

    return (f"  wave {k}: {w['requests']:.0f} requests sent {w['send_first']:.2f}-"
            f"{w['send_last']:.2f} s; first token p10/p50/p90/max {span('first_token')} s; "
            f"end {span('end')} s"
            + (f"; decode pace {w['decode_pace_ms']:.2f} ms/token" if "decode_pace_ms" in w
               else ""))


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

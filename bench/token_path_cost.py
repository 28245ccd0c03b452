"""What each process of a running cluster spends per streamed token: CPU time over a load run.

python -m bench.token_path_cost [--base-url http://127.0.0.1:8000] [--concurrency 32]
    [--output-len 256] [--num-prompts 96] [--out FILE]

Against a cluster that is already serving (started by `serve run` on this host), runs
`bench.serve`'s synthetic load and reads every Ray and HAProxy process's CPU time from /proc
before and after. Prints, per process kind (Serve replicas by deployment, summed over their
replicas), the CPU seconds used, the share of one core over the run and the CPU microseconds per
output token. The ingress's figure bounds the token rate one ingress replica can stream: at
1e6 / (us per token) tokens/s it needs a whole core. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench import serve as bench_serve

TICK = os.sysconf("SC_CLK_TCK")


def kind(cmdline: str) -> str | None:
    """The process's kind, or None for one that is not the cluster's. Ray renames a worker's
    process after the task it runs (`ray::ServeReplica:app:ingress.handle_request`), so
    replicas are keyed by their deployment."""
    if "haproxy" in cmdline.split(" ", 1)[0]:
        return "haproxy"
    m = re.match(r"ray::ServeReplica:[^:]+:([^.\s]+)", cmdline)
    if m:
        return f"replica {m.group(1)}"
    m = re.match(r"ray::([A-Za-z_]+)", cmdline)
    return m.group(1) if m else None


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """pid -> (kind, user + system CPU seconds) of every process of the cluster on this host."""
    found = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            # The command name may hold spaces and parentheses: split after its closing one.
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        k = kind(cmd)
        if k is not None:
            found[int(pid)] = (k, (int(fields[11]) + int(fields[12])) / TICK)
    return found


def spent(before: dict[int, tuple[str, float]],
          after: dict[int, tuple[str, float]]) -> tuple[Counter, Counter]:
    """CPU seconds per kind between two readings and the number of processes of each kind. A
    process keeps the kind it had first (a replica's name changes with its current task)."""
    used: Counter = Counter()
    count: Counter = Counter()
    for pid, (k1, t1) in after.items():
        k0, t0 = before.get(pid, (k1, 0.0))
        used[k0] += t1 - t0
        count[k0] += 1
    return used, count


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:8000")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--num-prompts", type=int, default=96)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    load = Path(tempfile.mkdtemp()) / "load.json"  # bench.serve's own results
    before, t0, me0 = cpu_seconds(), time.monotonic(), _own_cpu()
    bench_serve.main(["--base-url", args.base_url, "--workload", "synthetic", "--input-len",
                      str(args.input_len), "--output-len", str(args.output_len),
                      "--num-prompts", str(args.num_prompts), "--concurrency",
                      str(args.concurrency), "--request-rate", "inf", "--seed", "0",
                      "--no-progress", "--out", str(load)])
    wall = time.monotonic() - t0
    if not load.exists():
        raise SystemExit("the load run failed (above); no figures")
    run = json.loads(load.read_text())["runs"][0]
    tokens = run["total_output_tokens"]
    used, count = spent(before, cpu_seconds())
    used["client (bench.serve)"], count["client (bench.serve)"] = _own_cpu() - me0, 1
    rows = [{"kind": k, "processes": count[k], "cpu_s": round(s, 2),
             "cores": round(s / wall, 3), "us_per_token": round(1e6 * s / max(tokens, 1), 1)}
            for k, s in used.most_common() if s > 0]
    print(f"\n{tokens} output tokens in {wall:.1f} s ({tokens / wall:.0f} tok/s), "
          f"concurrency {args.concurrency}")
    print(f"{'process':<36} {'n':>3} {'CPU s':>8} {'cores':>6} {'us/token':>9}")
    for r in rows:
        print(f"{r['kind']:<36} {r['processes']:>3} {r['cpu_s']:>8.2f} {r['cores']:>6.2f} "
              f"{r['us_per_token']:>9.1f}")
    result = {"tokens": tokens, "wall_s": round(wall, 2), "concurrency": args.concurrency,
              "output_throughput": run["output_throughput"], "itl_ms": run["itl_ms"],
              "tpot_ms": run["tpot_ms"], "processes": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()

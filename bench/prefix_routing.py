"""Prefix-affine decode routing against Serve's default router, on one machine.

python -m bench.prefix_routing [--decode-replicas 2] [--prefill-replicas 1] [--rate 4]
    [--num-groups 4] [--group-size 8] [--prefix-len 256] [--suffix-len 32] [--output-len 32]
    [--decode-num-pages 1024] [--local-prefill-max-tokens 0] [--repeats 2]
    [--out docs/bench/prefix-routing-tiny-cpu.json]

Starts its own local Ray instance (never joins another one) and serves the tiny model with the
same app config twice per repeat, `routing.policy: default` then `prefix`, each time on fresh
replicas (empty caches), sends the shared-prefix workload (bench/workloads.py) through HTTP and
reads the decode replicas' /metrics: KV bytes moved and prefix blocks skipped per request.
Prints one table: per policy the mean over repeats, and prefix/default.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench import serve as bench_serve
from bench.ports import free_port

ZERO_CPU = {"ray_actor_options": {"num_cpus": 0}}


def app_args(policy: str, a: argparse.Namespace) -> dict[str, Any]:
    return {"mode": "disaggregated", "model": {"path": None},
            "engine": {"page_size": 16, "num_pages": 1024, "max_num_batched_tokens": 512},
            "prefill": {**ZERO_CPU, "num_replicas": a.prefill_replicas,
                        "engine": {"max_num_batched_tokens": 1024}},
            "decode": {**ZERO_CPU, "num_replicas": a.decode_replicas,
                       "engine": {"num_pages": a.decode_num_pages},
                       "local_prefill_max_tokens": a.local_prefill_max_tokens},
            "ingress": ZERO_CPU,
            "routing": {"policy": policy, "max_imbalance": a.max_imbalance}}


def decode_metrics(base: str) -> dict[str, dict[str, float]]:
    """Per decode replica (its `replica` label): KV bytes received, blocks skipped, requests."""
    names = {"pdserve_kv_transfer_bytes_total": "bytes",
             "pdserve_kv_transfer_blocks_skipped_total": "skipped",
             "pdserve_requests_total": "requests"}
    got: dict[str, dict[str, float]] = {}
    text = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        name = line.split("{", 1)[0]
        if name in names and 'role="decode"' in line:
            labels = line.split("{", 1)[1].split("}", 1)[0]
            replica = labels.split('replica="', 1)[1].split('"', 1)[0]
            totals = got.setdefault(replica, dict.fromkeys(names.values(), 0.0))
            totals[names[name]] += float(line.rsplit(" ", 1)[1])
    return got


def run_totals(base: str, before: dict[str, dict[str, float]], expected: int,
               timeout_s: float = 30.0) -> tuple[dict[str, float], list[float]]:
    """What the decode replicas of this run counted since `before`: the sums, and the requests
    per replica. Only replicas in /metrics now count (the hub may still list a deleted app's
    replica in `before`), and it waits until they have counted the `expected` requests."""
    deadline = time.time() + timeout_s
    while True:
        now = decode_metrics(base)
        deltas = {r: {k: v - before.get(r, {}).get(k, 0.0) for k, v in totals.items()}
                  for r, totals in now.items()}
        sums = {k: sum(d[k] for d in deltas.values()) for k in ("bytes", "skipped", "requests")}
        if sums["requests"] >= expected:
            return sums, sorted(d["requests"] for d in deltas.values())
        if time.time() > deadline:
            raise RuntimeError(f"/metrics counted {sums['requests']:.0f} of {expected} decode "
                               f"requests after {timeout_s:.0f} s: {now}")
        time.sleep(0.5)


def wait_healthy(base: str, timeout_s: float = 300) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{base}/health", timeout=5).status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{base}/health not 200 after {timeout_s:.0f} s")




def one_run(policy: str, a: argparse.Namespace, base: str, seed: str) -> dict[str, Any]:
    from ray import serve

    from cluster.app import build_app
    serve.run(build_app(app_args(policy, a)), name="pd", route_prefix="/")
    wait_healthy(base)
    before = decode_metrics(base)  # /health touches no decode KV, but be exact
    out = Path(tempfile.mkdtemp()) / f"{policy}.json"
    bench_serve.main(["--base-url", base, "--workload", "shared-prefix", "--num-groups",
                      str(a.num_groups), "--group-size", str(a.group_size), "--prefix-len",
                      str(a.prefix_len), "--suffix-len", str(a.suffix_len), "--output-len",
                      str(a.output_len), "--request-rate", str(a.rate), "--seed", seed,
                      "--no-progress", "--out", str(out)])
    run = json.loads(out.read_text())["runs"][0]
    totals, per_replica = run_totals(base, before, run["completed"])
    serve.delete("pd")  # the next run starts on fresh replicas: empty prefix caches
    reqs = totals["requests"]
    return {"kv_bytes_per_request": totals["bytes"] / reqs,
            "blocks_skipped_per_request": totals["skipped"] / reqs,
            "ttft_p50_ms": run["ttft_ms"]["p50"], "ttft_p99_ms": run["ttft_ms"]["p99"],
            "tpot_p50_ms": run["tpot_ms"]["p50"], "output_tok_s": run["output_throughput"],
            "requests": reqs, "requests_per_replica": per_replica}


def table(results: dict[str, list[dict[str, Any]]]) -> str:
    mean = {p: {k: sum(r[k] for r in rs) / len(rs) for k in rs[0] if k != "requests_per_replica"}
            for p, rs in results.items()}
    rows = [f"{'metric':<28}{'default':>12}{'prefix':>12}{'prefix/default':>16}"]
    for key in ("kv_bytes_per_request", "blocks_skipped_per_request", "ttft_p50_ms",
                "ttft_p99_ms", "tpot_p50_ms", "output_tok_s"):
        d, p = mean["default"][key], mean["prefix"][key]
        ratio = f"{p / d:.2f}x" if d else "-"
        rows.append(f"{key:<28}{d:>12.1f}{p:>12.1f}{ratio:>16}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--decode-replicas", type=int, default=2)
    ap.add_argument("--prefill-replicas", type=int, default=1)
    ap.add_argument("--decode-num-pages", type=int, default=1024)
    ap.add_argument("--rate", default="4", help="requests/s (Poisson), or inf")
    ap.add_argument("--num-groups", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--prefix-len", type=int, default=256)
    ap.add_argument("--suffix-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--max-imbalance", type=int, default=4, help="routing.max_imbalance")
    ap.add_argument("--local-prefill-max-tokens", type=int, default=0,
                    help="decode.local_prefill_max_tokens")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON with every run")
    a = ap.parse_args(argv)

    import ray
    from ray import serve

    from engine.tiny_model import ensure_tiny_model
    ensure_tiny_model()
    port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    results: dict[str, list[dict[str, Any]]] = {"default": [], "prefix": []}
    try:
        for rep in range(a.repeats):
            # Alternating, the same prompts for both policies within a repeat: machine noise
            # falls on both alike.
            for policy in ("default", "prefix"):
                r = one_run(policy, a, base, str(a.seed * 1000 + rep))
                results[policy].append(r)
                print(f"repeat {rep} {policy}: {json.dumps(r)}", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    print(f"\nshared-prefix: {a.num_groups} groups x {a.group_size}, prefix {a.prefix_len}, "
          f"suffix {a.suffix_len}, output {a.output_len}, {a.rate} req/s; "
          f"{a.prefill_replicas} prefill + {a.decode_replicas} decode replicas, decode "
          f"num_pages {a.decode_num_pages}; mean of {a.repeats} repeats\n")
    print(table(results))
    if a.out:
        Path(a.out).write_text(json.dumps({"args": vars(a), "runs": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()

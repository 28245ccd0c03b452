"""The cluster on CPU, end to end: `serve run CONFIG` readiness, one stream vs 32 streams.

python -m bench.cpu_cluster [--config configs/tiny.yaml] [--out-dir DIR]
Prints time to first HTTP 200, TTFT and TPOT of one stream, output tokens/s at concurrency
1 and 32 and their ratio, KV bytes moved per request and how many requests the decode replica
prefilled itself (from /metrics). The two runs' JSON goes to DIR (default: a new temporary
directory, printed; `--out-dir docs/bench` replaces the committed ones). First, before the
server starts, the same workload on the config's serving engine alone in this process, on one
torch thread as its replica gets (bench/engine_alone.py; `--no-engine-alone` skips it): the
ratio through Serve is compared with the engine's own.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from bench import engine_alone
from bench import serve as bench_serve
from bench.launcher import ServerProcess, expand
from bench.soak import role_totals


def kv_bytes(base: str) -> tuple[float, float, float]:
    """(KV bytes received by decode replicas, requests they served, and of those the ones they
    prefilled themselves: `decode.local_prefill_max_tokens`) from /metrics."""
    return role_totals(base, "decode", ("pdserve_kv_transfer_bytes_total",
                                        "pdserve_requests_total", "pdserve_local_prefills_total"))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--base-url", default="http://127.0.0.1:8000")
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--engine-alone", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args(argv)
    alone = None
    if args.engine_alone:
        alone = engine_alone.main(["--config", args.config, "--input-len", str(args.input_len),
                                   "--output-len", str(args.output_len)])
    scratch = Path(tempfile.mkdtemp(prefix="cpu_cluster-"))  # serve.log; the JSON by default
    out = Path(args.out_dir) if args.out_dir else scratch
    out.mkdir(parents=True, exist_ok=True)
    log = scratch / "serve.log"
    # No `ray stop` afterwards: serve run owns the Ray instance it started and ends it on exit.
    server = ServerProcess(expand("{serve} run {config}", args.config), f"{args.base_url}/health",
                           log)
    server.start()
    try:
        ready_s = server.wait_ready(timeout=300)
        results = {}
        for conc, n in ((1, 8), (32, 64)):
            path = out / f"tiny-cpu-c{conc}.json"
            bench_serve.main(["--base-url", args.base_url, "--workload", "synthetic",
                              "--input-len", str(args.input_len), "--output-len",
                              str(args.output_len), "--num-prompts", str(n), "--concurrency",
                              str(conc), "--request-rate", "inf", "--seed", "0",
                              "--no-progress", "--out", str(path)])
            results[conc] = json.loads(path.read_text())["runs"][0]
        moved, served, local = kv_bytes(args.base_url)
    finally:
        server.stop()
    one, many = results[1], results[32]
    print(f"\nconfig {args.config}: first HTTP 200 after {ready_s:.1f} s")
    print(f"1 stream:   TTFT p50 {one['ttft_ms']['p50']:.1f} ms, TPOT p50 "
          f"{one['tpot_ms']['p50']:.2f} ms, {one['output_throughput']:.1f} tok/s")
    print(f"32 streams: TTFT p50 {many['ttft_ms']['p50']:.1f} ms, TPOT p50 "
          f"{many['tpot_ms']['p50']:.2f} ms, {many['output_throughput']:.1f} tok/s")
    print(f"throughput ratio 32/1: {many['output_throughput'] / one['output_throughput']:.2f}x")
    if alone is not None:
        print(f"engine alone, same workload: {alone[0].tok_s:.1f} and {alone[1].tok_s:.1f} "
              f"tok/s, {alone[1].tok_s / alone[0].tok_s:.2f}x")
    if served:
        print(f"KV bytes moved per request: {moved / served:.0f} ({served:.0f} requests, "
              f"{local:.0f} of them prefilled on the decode replica)")
    print(f"JSON: {out}/tiny-cpu-c1.json, {out}/tiny-cpu-c32.json")


if __name__ == "__main__":
    main()

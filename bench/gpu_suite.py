"""One GPU session: JIT builds, the GPU tests, then every GPU benchmark, under one deadline.

Each part runs as its own process with its own time limit; its output goes to DIR/<part>.log
and the JSON rows of the benchmarks to DIR/results.jsonl. The last lines printed are each
part's summary, so a truncated console still shows the figures.

    python -m bench.gpu_suite --dir $OUT --parts jit,tests,decode,prefill,grid,cascade,transfer
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

PY = sys.executable


def commands(out: Path, extra: dict[str, str]) -> dict[str, list[str]]:
    res = str(out / "results.jsonl")
    cmds = {
        "jit": [PY, "-m", "bench.gpu_jit"],
        "tests": [PY, "-m", "pytest", "tests/gpu", "-q", "-p", "no:cacheprovider"],
        "decode": [PY, "-m", "bench.gpu_decode", "--out", res, "--profile", "--host-profile"],
        "prefill": [PY, "-m", "bench.gpu_prefill", "--out", res],
        "grid": [PY, "-m", "bench.gpu_cascade", "grid", "--out", res, "--compare-backend", "auto"],
        "cascade": [PY, "-m", "bench.gpu_cascade", "engine", "--out", res, "--host-profile"],
        "transfer": [PY, "-m", "bench.gpu_transfer"],
    }
    for part, args in extra.items():
        cmds[part] += args.split()
    return cmds


SUMMARY_LINES = {"jit": 8, "tests": 15, "decode": 8, "prefill": 5, "grid": 45, "cascade": 32,
                 "transfer": 12}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", required=True)
    ap.add_argument("--parts", default="jit,tests,decode,prefill,grid,cascade")
    ap.add_argument("--deadline", type=float, default=570.0, help="seconds for the whole run")
    ap.add_argument("--limit", action="append", default=[], help="PART=SECONDS")
    ap.add_argument("--args", action="append", default=[], help="PART='extra args'")
    args = ap.parse_args()
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    limits = dict(kv.split("=", 1) for kv in args.limit)
    extra = dict(kv.split("=", 1) for kv in args.args)
    cmds = commands(out, extra)
    t0 = time.perf_counter()
    done = []
    for part in args.parts.split(","):
        left = args.deadline - (time.perf_counter() - t0)
        limit = min(float(limits.get(part, left)), left)
        if limit < 10:
            done.append((part, "skipped: no time left", 0.0))
            continue
        log = out / f"{part}.log"
        start = time.perf_counter()
        with open(log, "w") as f:
            try:
                rc = subprocess.run(cmds[part], stdout=f, stderr=subprocess.STDOUT,
                                    timeout=limit).returncode
            except subprocess.TimeoutExpired:
                rc = f"timeout after {limit:.0f} s"
        done.append((part, rc, time.perf_counter() - start))
        print(f"[{time.perf_counter() - t0:6.0f} s] {part}: rc {rc}", flush=True)
    for part, rc, secs in done:
        print(f"\n===== {part} (rc {rc}, {secs:.0f} s) =====")
        log = out / f"{part}.log"
        if log.exists():
            lines = log.read_text(errors="replace").splitlines()
            print("\n".join(lines[-SUMMARY_LINES[part]:]))


if __name__ == "__main__":
    main()

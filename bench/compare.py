"""`python -m bench.compare`: the same benchmark against pdserve colocated, then disaggregated.

Each config is started with `serve run CONFIG` (one at a time, on the same machine, so both get
the same resources), benchmarked once healthy with the `bench.serve` flags given here, and shut
down before the next. The report puts the systems side by side, with ratios to the first
(the baseline): goodput, throughput, TTFT and TPOT percentiles, at the rates all systems ran.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.launcher import DEFAULT_LAUNCH, DEFAULT_STOP, ServerProcess, expand
from bench.report import fmt, format_table, rate_str, write_json
from bench.serve import add_benchmark_args, check_args, client_config, run_benchmark

DEFAULT_CONFIGS = ("configs/tiny-colocated.yaml", "configs/tiny.yaml")

# (label, run key, summary key or None for a plain value, digits)
ROWS = (
    ("request throughput (req/s)", "request_throughput", None, 2),
    ("output throughput (tok/s)", "output_throughput", None, 1),
    ("TTFT p50 (ms)", "ttft_ms", "p50", 1),
    ("TTFT p99 (ms)", "ttft_ms", "p99", 1),
    ("TPOT p50 (ms)", "tpot_ms", "p50", 2),
    ("TPOT p99 (ms)", "tpot_ms", "p99", 2),
    ("SLO attainment", "slo_attainment", None, 3),
)


def _ratio(x: Any, base: Any) -> str:
    if not isinstance(x, (int, float)) or not isinstance(base, (int, float)) or not base:
        return "-"
    return f"{x / base:.2f}x"


def _value(run: dict[str, Any], key: str, sub: str | None) -> Any:
    v = run.get(key)
    return v.get(sub) if isinstance(v, dict) and sub else v


def common_rates(systems: dict[str, dict[str, Any]]) -> list[str]:
    """Rates (as strings) that every system ran, in increasing order."""
    sets = [{rate_str(r["rate"]) for r in res["runs"]} for res in systems.values()]
    common = set.intersection(*sets) if sets else set()
    return sorted(common, key=lambda r: float(r))


def _first_run_at(res: dict[str, Any], rate: str) -> dict[str, Any]:
    return next(r for r in res["runs"] if rate_str(r["rate"]) == rate)


def comparison_rows(systems: dict[str, dict[str, Any]]) -> list[list[str]]:
    """Side-by-side rows: a metric, its value per system, and each system's ratio to the
    first. Only systems with results take part."""
    labels = list(systems)
    rows: list[list[str]] = []
    gps = [(systems[lb].get("goodput") or {}).get("goodput_rps") for lb in labels]
    if any(g is not None for g in gps):
        rows.append(["goodput (req/s)"] + [fmt(g, 3) for g in gps]
                    + [_ratio(g, gps[0]) for g in gps[1:]])
    for rate in common_rates(systems):
        runs = [_first_run_at(systems[lb], rate) for lb in labels]
        for name, key, sub, digits in ROWS:
            vals = [_value(r, key, sub) for r in runs]
            if all(v is None for v in vals):
                continue
            rows.append([f"@{rate} req/s {name}"] + [fmt(v, digits) for v in vals]
                        + [_ratio(v, vals[0]) for v in vals[1:]])
    return rows


def format_comparison(systems: dict[str, dict[str, Any]]) -> str:
    labels = list(systems)
    header = ["metric", *labels] + [f"{lb}/{labels[0]}" for lb in labels[1:]]
    return format_table(header, comparison_rows(systems))


def write_plots(systems: dict[str, dict[str, Any]], plot_dir: Path) -> list[Path]:
    from bench import plots  # matplotlib only when plots are asked for

    paths = []
    rates = common_rates(systems)
    if rates:
        top = rates[-1]
        series = [(f"{lb} @{top} req/s", _first_run_at(res, top)) for lb, res in systems.items()]
        paths.append(plots.plot_latency_cdfs(series, plot_dir / "compare_latency_cdf.png"))
    gps = {lb: res["goodput"] for lb, res in systems.items() if res.get("goodput")}
    points = {lb: plots.attainment_points(systems[lb]["runs"]) for lb in gps}
    if gps and any(len(p) > 1 for p in points.values()):
        target = next(iter(gps.values()))["target"]
        paths.append(plots.plot_attainment(
            points, target, plot_dir / "compare_slo_attainment.png",
            {lb: g["goodput_rps"] for lb, g in gps.items()},
        ))
    return paths


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench.compare", description=__doc__.splitlines()[0])
    p.add_argument("configs", nargs="*", default=list(DEFAULT_CONFIGS),
                   help=f"Serve configs, baseline first (default: {' '.join(DEFAULT_CONFIGS)})")
    p.add_argument("--labels", default=None,
                   help="comma-separated (default: colocated,disaggregated for two configs)")
    p.add_argument("--launch", default=DEFAULT_LAUNCH,
                   help="command template; {config} {python} {serve} {ray} are filled in")
    p.add_argument("--stop-cmd", action="append", default=None,
                   help=f"run after interrupting the server; repeatable; 'none' for none "
                        f"(default: {'; '.join(DEFAULT_STOP)})")
    p.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to get healthy")
    p.add_argument("--settle", type=float, default=5.0, help="seconds between systems")
    p.add_argument("--log-dir", type=Path, default=None, help="server logs (default: a tempdir)")
    add_benchmark_args(p)
    return p


def _labels(args: argparse.Namespace, p: argparse.ArgumentParser) -> list[str]:
    if args.labels:
        labels = [x.strip() for x in args.labels.split(",")]
    elif len(args.configs) == 2:
        labels = ["colocated", "disaggregated"]
    else:
        labels = [Path(c).stem for c in args.configs]
    if len(labels) != len(args.configs) or len(set(labels)) != len(labels):
        p.error("need one distinct label per config")
    return labels


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    if len(args.configs) < 2:
        parser.error("compare needs at least two configs")
    labels = _labels(args, parser)
    stops = [] if args.stop_cmd == ["none"] else (args.stop_cmd or list(DEFAULT_STOP))
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="pdserve-compare-"))
    health = args.base_url.rstrip("/") + "/health"

    systems: dict[str, dict[str, Any]] = {}
    failures: dict[str, str] = {}
    for i, (label, config) in enumerate(zip(labels, args.configs)):
        if i:
            time.sleep(args.settle)  # let ports and the previous cluster's processes go
        server = ServerProcess(expand(args.launch, config), health, log_dir / f"{label}.log",
                               [expand(c, config) for c in stops])
        print(f"[compare] {label}: starting {config} (log {server.log_path})", file=sys.stderr)
        with server:
            try:
                waited = server.wait_ready(args.ready_timeout)
                print(f"[compare] {label}: healthy after {waited:.1f} s", file=sys.stderr)
                results = run_benchmark(args, client_config(args), label=label)
            except (RuntimeError, TimeoutError, OSError) as e:
                failures[label] = str(e)
                print(f"[compare] {label} failed: {e}", file=sys.stderr)
                continue
        results["config"] = config
        systems[label] = results

    if len(systems) >= 2:
        print(format_comparison(systems))
    for label, err in failures.items():
        print(f"{label}: FAILED: {err.splitlines()[0] if err else ''}")
    if args.out:
        write_json(args.out, {"systems": systems, "failures": failures,
                              "comparison": comparison_rows(systems) if systems else []})
    if args.plot_dir and systems:
        for path in write_plots(systems, args.plot_dir):
            print(f"plot: {path}", file=sys.stderr)
    ok = not failures and all(any(r["completed"] for r in s["runs"]) for s in systems.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""`python -m bench.serve`: load-test an OpenAI-compatible server, optionally find its goodput.

Three modes over the same workload: one run at --request-rate / --concurrency; a sweep over
--sweep-rates; or --goodput, a doubling-then-bisection search for the highest rate at which
--attainment of the requests meet both --slo-ttft-ms and --slo-tpot-ms (DistServe's goodput).
Every run gets fresh prompts derived from (seed, rate, concurrency, repeat), so a server's
prefix cache does not carry over between runs, yet two servers see identical runs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from bench import stats
from bench.client import fetch_first_model
from bench.loadgen import ClientConfig, run_http
from bench.progress import Progress
from bench.report import format_run, format_runs, rate_str, summarize_run, write_json
from bench.workloads import PROMPT_FORMATS, WORKLOADS, WorkloadConfig, build_workload


def _rates(text: str) -> list[float]:
    rates = sorted({float(x) for x in text.split(",") if x.strip()})
    if not rates or rates[0] <= 0:
        raise argparse.ArgumentTypeError("rates must be a comma-separated list of numbers > 0")
    return rates


def add_benchmark_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by `bench.serve` and `bench.compare`."""
    g = p.add_argument_group("server")
    g.add_argument("--base-url", default="http://127.0.0.1:8000")
    g.add_argument("--endpoint", default="/v1/completions")
    g.add_argument("--model", default=None, help="default: the first of GET /v1/models")
    g.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--count-empty-chunks", action="store_true",
                   help="time empty-text chunks as tokens (servers of random-weight models)")
    g.add_argument("--include-usage", action=argparse.BooleanOptionalAction, default=True,
                   help="ask for usage in the last chunk (exact output token counts)")
    g.add_argument("--extra-body", type=json.loads, default={}, help="JSON merged into requests")
    g.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")

    g = p.add_argument_group("workload")
    g.add_argument("--workload", choices=WORKLOADS, default="synthetic")
    g.add_argument("--num-prompts", type=int, default=100, help="per run (not shared-prefix)")
    g.add_argument("--input-len", default=None,
                   help="N | fixed:N | uniform:LO:HI | normal:MEAN:STD[:MIN[:MAX]] "
                        "(default fixed:128; long-prompt fixed:2048)")
    g.add_argument("--output-len", default=None, help="as --input-len (default fixed:128; "
                                                      "long-prompt fixed:16)")
    g.add_argument("--num-groups", type=int, default=4, help="shared-prefix groups")
    g.add_argument("--group-size", type=int, default=8, help="shared-prefix requests per group")
    g.add_argument("--prefix-len", type=int, default=512)
    g.add_argument("--suffix-len", type=int, default=32)
    g.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="ids")
    g.add_argument("--vocab-size", type=int, default=1000, help="token ids are drawn below this")
    g.add_argument("--seed", type=int, default=0)

    g = p.add_argument_group("load")
    g.add_argument("--request-rate", type=float, default=math.inf,
                   help="Poisson arrivals per second; inf sends all at once")
    g.add_argument("--burstiness", type=float, default=1.0, help="gamma shape; 1 is Poisson")
    g.add_argument("--concurrency", type=int, default=None, help="cap on requests in flight")
    g.add_argument("--warmup", type=int, default=0, help="unmeasured requests sent first")
    g.add_argument("--repeats", type=int, default=1, help="runs per rate")
    g.add_argument("--client-processes", type=int, default=1,
                   help="client processes sharing the requests and the concurrency (one Python "
                        "process can lag tens of thousands of streamed events a second)")

    g = p.add_argument_group("SLOs and goodput")
    g.add_argument("--slo-ttft-ms", type=float, default=None)
    g.add_argument("--slo-tpot-ms", type=float, default=None)
    g.add_argument("--attainment", type=float, default=0.9)
    g.add_argument("--sweep-rates", type=_rates, default=None, help="e.g. 0.5,1,2,4")
    g.add_argument("--goodput", action="store_true", help="search for the goodput rate")
    g.add_argument("--start-rate", type=float, default=1.0)
    g.add_argument("--min-rate", type=float, default=1.0 / 64)
    g.add_argument("--max-rate", type=float, default=256.0)
    g.add_argument("--rel-tol", type=float, default=0.1, help="bisection stops at this width")
    g.add_argument("--max-probes", type=int, default=12)

    g = p.add_argument_group("output")
    g.add_argument("--record-metrics", type=lambda t: [x for x in t.split(",") if x], default=[],
                   help="comma-separated metric names read from the server's /metrics after "
                        "each run into its results (e.g. pdserve_autoscaler_target_replicas)")
    g.add_argument("--out", type=Path, default=None, help="results JSON")
    g.add_argument("--plot-dir", type=Path, default=None, help="write PNG plots here")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction,
                   default=sys.stderr.isatty())


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.goodput and args.sweep_rates:
        p.error("--goodput and --sweep-rates are exclusive")
    if args.goodput and args.slo_ttft_ms is None and args.slo_tpot_ms is None:
        p.error("--goodput needs --slo-ttft-ms and/or --slo-tpot-ms")
    if not 0.0 < args.attainment <= 1.0:
        p.error("--attainment must be in (0, 1]")
    if (args.repeats < 1 or args.client_processes < 1
            or (args.concurrency is not None and args.concurrency < 1)):
        p.error("--repeats, --client-processes and --concurrency must be >= 1")
    try:
        workload_config(args)
    except ValueError as e:
        p.error(str(e))


def workload_config(args: argparse.Namespace) -> WorkloadConfig:
    return WorkloadConfig(
        args.workload, args.num_prompts, args.input_len, args.output_len, args.num_groups,
        args.group_size, args.prefix_len, args.suffix_len, args.prompt_format, args.vocab_size,
    )


def client_config(args: argparse.Namespace, base_url: str | None = None) -> ClientConfig:
    base = base_url or args.base_url
    return ClientConfig(
        base, args.endpoint, args.model or fetch_first_model(base), args.ignore_eos,
        args.include_usage, args.timeout, args.extra_body, args.count_empty_chunks,
    )


def scrape(base_url: str, names: Sequence[str]) -> dict[str, float]:
    """The series of `names` on the server's Prometheus `/metrics`, keyed by series (name and
    labels); empty if the server has none or no `/metrics`."""
    try:
        with urllib.request.urlopen(base_url.rstrip("/") + "/metrics", timeout=10) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    found = {}
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        if series.split("{", 1)[0] in names:
            found[series] = float(value)
    return found


def run_benchmark(
    args: argparse.Namespace, client: ClientConfig, label: str = ""
) -> dict[str, Any]:
    """All runs of the chosen mode against one server; returns the results dict."""
    wl = workload_config(args)
    runs: list[dict[str, Any]] = []
    repeats_at: dict[tuple[str, int | None], int] = {}

    if args.warmup > 0:
        warm = replace(wl, name="synthetic", num_prompts=args.warmup)
        run_http(build_workload(warm, f"{args.seed}:warmup"), client, math.inf, args.concurrency)

    def one_run(rate: float, concurrency: int | None) -> float:
        rep = repeats_at.get((rate_str(rate), concurrency), 0)
        repeats_at[(rate_str(rate), concurrency)] = rep + 1
        key = f"{args.seed}:{rate_str(rate)}:{concurrency}:{rep}"
        specs = build_workload(wl, key)
        desc = f"{label} rate {rate_str(rate)}".strip()
        progress = Progress(len(specs), desc, enabled=args.progress)
        result = run_http(specs, client, rate, concurrency, key, args.burstiness, progress,
                          args.client_processes)
        run = summarize_run(result, args.slo_ttft_ms, args.slo_tpot_ms, label=label, repeat=rep)
        if args.record_metrics:
            run["metrics"] = scrape(client.base_url, args.record_metrics)
        runs.append(run)
        att = run.get("slo_attainment", math.nan)
        print(
            f"[bench] {desc}: {run['completed']}/{run['num_requests']} ok, "
            f"TTFT p99 {run['ttft_ms']['p99']:.1f} ms, TPOT p99 {run['tpot_ms']['p99']:.1f} ms"
            + ("" if math.isnan(att) else f", SLO attainment {100 * att:.1f}%"),
            file=sys.stderr,
        )
        if run.get("metrics"):
            print(f"[bench] {desc}: " + ", ".join(f"{k} {v:g}" for k, v in run["metrics"].items()),
                  file=sys.stderr)
        return att

    goodput: dict[str, Any] | None = None
    slo_info = {"target": args.attainment, "slo_ttft_ms": args.slo_ttft_ms,
                "slo_tpot_ms": args.slo_tpot_ms}
    if args.goodput:
        found = stats.search_goodput(
            lambda r: one_run(r, args.concurrency), args.attainment, args.start_rate,
            args.max_rate, args.min_rate, args.rel_tol, args.max_probes, args.repeats,
        )
        goodput = {"method": "search", "goodput_rps": found.goodput, **slo_info,
                   "upper_bound_rps": found.upper_bound, "saturated": found.saturated,
                   "points": found.probes}
    elif args.sweep_rates:
        points = []
        for rate in args.sweep_rates:
            atts = [one_run(rate, args.concurrency) for _ in range(args.repeats)]
            points.append((rate, stats.mean(atts)))
        if args.slo_ttft_ms is not None or args.slo_tpot_ms is not None:
            rates, atts = [p[0] for p in points], [p[1] for p in points]
            best = stats.goodput_from_sweep(rates, atts, args.attainment)
            goodput = {"method": "sweep", "goodput_rps": best, **slo_info, "points": points,
                       "saturated": best == rates[-1]}
    else:
        for _ in range(args.repeats):
            one_run(args.request_rate, args.concurrency)
    flags = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    return {"label": label, "model": client.model, "base_url": client.base_url,
            "workload": asdict(wl), "args": flags, "runs": runs, "goodput": goodput}


def format_results(results: dict[str, Any]) -> str:
    runs = results["runs"]
    out = [format_run(r) for r in runs] if len(runs) <= 2 else [format_runs(runs)]
    gp = results.get("goodput")
    if gp:
        hi = gp.get("upper_bound_rps")
        bound = "" if hi is None else f" (misses at {hi:.3g})"
        sat = " (never missed: raise --max-rate)" if gp.get("saturated") else ""
        out.append(f"goodput: {gp['goodput_rps']:.3g} req/s at {100 * gp['target']:g}% "
                   f"attainment{bound}{sat}")
    return "\n\n".join(out)


def write_plots(results: dict[str, Any], plot_dir: Path, prefix: str = "") -> list[Path]:
    from bench import plots  # matplotlib only when plots are asked for

    runs = sorted(results["runs"], key=lambda r: float(r["rate"]))
    series = [(f"rate {rate_str(r['rate'])}" + (f" #{r['repeat']}" if r.get("repeat") else ""), r)
              for r in runs]
    paths = [plots.plot_latency_cdfs(series, plot_dir / f"{prefix}latency_cdf.png")]
    points = plots.attainment_points(runs)
    gp = results.get("goodput")
    if len(points) > 1 and gp:
        label = results.get("label") or "server"
        paths.append(plots.plot_attainment({label: points}, gp["target"],
                                           plot_dir / f"{prefix}slo_attainment.png",
                                           {label: gp["goodput_rps"]}))
    return paths


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench.serve", description=__doc__.splitlines()[0])
    add_benchmark_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    try:
        client = client_config(args)
    except OSError as e:  # urllib's errors included: no server, or no /v1/models
        print(f"cannot reach {args.base_url}: {e}", file=sys.stderr)
        return 2
    results = run_benchmark(args, client)
    print(format_results(results))
    if args.out:
        write_json(args.out, results)
    if args.plot_dir:
        for path in write_plots(results, args.plot_dir):
            print(f"plot: {path}", file=sys.stderr)
    return 0 if any(r["completed"] for r in results["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())

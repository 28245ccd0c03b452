"""Turning run records into summaries (plain dicts, JSON-ready) and text tables.

A run summary is what the JSON file stores and what plots and comparisons read, so everything
downstream works the same from a live run or from a saved results file. Latencies are in ms.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import stats
from bench.loadgen import LoadResult

METRICS = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E"))


def _ms(x: float | None) -> float | None:
    return None if x is None else x * 1e3


def summarize_run(
    result: LoadResult,
    slo_ttft_ms: float | None = None,
    slo_tpot_ms: float | None = None,
    **meta: Any,
) -> dict[str, Any]:
    recs = result.records
    ok = [r for r in recs if r.ok]
    dur = result.duration
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    ttft = [r.ttft for r in ok if r.ttft is not None]
    tpot = [t for r in ok if (t := r.tpot) is not None]
    itl = [x for r in ok for x in r.itl]
    e2e = [r.e2e for r in ok if r.e2e is not None]
    run: dict[str, Any] = {
        **meta,
        "rate": result.rate,
        "concurrency": result.concurrency,
        "num_requests": len(recs),
        "completed": len(ok),
        "failed": len(recs) - len(ok),
        "duration_s": dur,
        "start_unix": result.start_unix,
        "client_cpu_s": result.client_cpu_s,
        "request_throughput": len(ok) / dur if dur > 0 else math.nan,
        "output_throughput": out_tokens / dur if dur > 0 else math.nan,
        "input_throughput": in_tokens / dur if dur > 0 else math.nan,
        "total_output_tokens": out_tokens,
        "total_input_tokens": in_tokens,
        "ttft_ms": stats.summarize(ttft, 1e3),
        "tpot_ms": stats.summarize(tpot, 1e3),
        "itl_ms": stats.summarize(itl, 1e3),
        "e2e_ms": stats.summarize(e2e, 1e3),
        "errors": sorted({r.error for r in recs if r.error})[:5],
        "requests": [
            {
                "send_s": r.send_time,
                "prompt_tokens": r.prompt_tokens,
                "output_tokens": r.output_tokens,
                "ttft_ms": _ms(r.ttft),
                "tpot_ms": _ms(r.tpot),
                "e2e_ms": _ms(r.e2e),
                "error": r.error,
            }
            for r in recs
        ],
    }
    if slo_ttft_ms is not None or slo_tpot_ms is not None:
        att = stats.slo_attainment(
            [r.ttft if r.ok else None for r in recs],
            [r.tpot for r in recs],
            None if slo_ttft_ms is None else slo_ttft_ms / 1e3,
            None if slo_tpot_ms is None else slo_tpot_ms / 1e3,
        )
        run["slo"] = {"ttft_ms": slo_ttft_ms, "tpot_ms": slo_tpot_ms}
        run["slo_attainment"] = att
        # Requests per second that met the SLOs (vLLM calls this request goodput).
        run["good_request_throughput"] = att * len(recs) / dur if dur > 0 else math.nan
    return run


def rate_str(rate: float | str | None) -> str:
    if rate is None or rate == "inf" or (isinstance(rate, float) and math.isinf(rate)):
        return "inf"
    return f"{float(rate):g}"


def fmt(x: Any, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    # First column (names) left-aligned, numbers right-aligned.
    lines = [
        "  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                  for i, (c, w) in enumerate(zip(r, widths)))
        for r in (header, *rows)
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_run(run: dict[str, Any]) -> str:
    """The full report of one run: counts, throughputs, SLOs, latency percentiles."""
    conc = run.get("concurrency") or "-"
    label = f"{run['label']}: " if run.get("label") else ""
    out = [
        f"== {label}rate {rate_str(run['rate'])} req/s, concurrency {conc} ==",
        f"requests: {run['completed']} ok, {run['failed']} failed in {run['duration_s']:.2f} s",
        f"request throughput: {fmt(run['request_throughput'])} req/s",
        f"output throughput:  {fmt(run['output_throughput'], 1)} tok/s "
        f"(input {fmt(run['input_throughput'], 1)} tok/s)",
        f"client CPU:         {fmt(run.get('client_cpu_s', math.nan))} s "
        f"({fmt(100 * run.get('client_cpu_s', math.nan) / run['duration_s'], 0)}% of a core)",
    ]
    if "slo_attainment" in run:
        slo = run["slo"]
        out.append(
            f"SLO (TTFT <= {fmt(slo['ttft_ms'], 0)} ms, TPOT <= {fmt(slo['tpot_ms'], 0)} ms): "
            f"{fmt(100 * run['slo_attainment'], 1)}% attained, "
            f"{fmt(run['good_request_throughput'])} good req/s"
        )
    rows = [
        [name] + [fmt(run[key][k]) for k in ("mean", "p50", "p90", "p99")]
        for key, name in METRICS
    ]
    out.append(format_table(["ms", "mean", "p50", "p90", "p99"], rows))
    for err in run.get("errors", []):
        out.append(f"error: {err}")
    return "\n".join(out)


def format_runs(runs: Sequence[dict[str, Any]]) -> str:
    """One row per run, for sweeps and goodput searches."""
    header = ["rate", "conc", "ok/fail", "req/s", "tok/s", "TTFT p50", "TTFT p99",
              "TPOT p50", "TPOT p99", "ITL p99", "E2E p50", "SLO att."]
    rows = []
    for r in runs:
        att = r.get("slo_attainment")
        rows.append([
            rate_str(r["rate"]), str(r.get("concurrency") or "-"),
            f"{r['completed']}/{r['failed']}",
            fmt(r["request_throughput"]), fmt(r["output_throughput"], 1),
            fmt(r["ttft_ms"]["p50"], 1), fmt(r["ttft_ms"]["p99"], 1),
            fmt(r["tpot_ms"]["p50"], 1), fmt(r["tpot_ms"]["p99"], 1),
            fmt(r["itl_ms"]["p99"], 1), fmt(r["e2e_ms"]["p50"], 1),
            "-" if att is None else f"{fmt(100 * att, 1)}%",
        ])
    return format_table(header, rows)


def jsonable(obj: Any) -> Any:
    """Strict-JSON copy: nan becomes null and inf the string 'inf' (json.dump would otherwise
    write NaN/Infinity, which most JSON readers reject)."""
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        return ("inf" if obj > 0 else "-inf") if math.isinf(obj) else obj
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def write_json(path: str | Path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n")

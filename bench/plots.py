"""PNG plots from run summaries: latency CDFs, and SLO attainment against request rate."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402

from bench.report import rate_str  # noqa: E402


def _values(run: dict[str, Any], key: str) -> list[float]:
    return sorted(v for r in run["requests"] if (v := r.get(key)) is not None)


def plot_latency_cdfs(series: Sequence[tuple[str, dict[str, Any]]], path: str | Path) -> Path:
    """One line per (label, run) in each of two panels: TTFT and TPOT CDFs, SLOs dashed."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in zip(axes, ("ttft_ms", "tpot_ms"), ("TTFT", "TPOT")):
        slo = None
        for label, run in series:
            xs = _values(run, key)
            if xs:
                ys = [(i + 1) / len(xs) for i in range(len(xs))]
                ax.step(xs, ys, where="post", label=label)
            slo = slo or (run.get("slo") or {}).get(key)
        if slo:
            ax.axvline(slo, color="gray", linestyle="--", linewidth=1, label=f"SLO {slo:g} ms")
        ax.set_xlabel(f"{title} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_attainment(
    series: dict[str, Sequence[tuple[float, float]]],
    target: float,
    path: str | Path,
    goodputs: dict[str, float] | None = None,
) -> Path:
    """SLO attainment against request rate, one line per label, with the target and each
    label's goodput marked."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label, points in series.items():
        pts = sorted(points)
        line = ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=label)
        gp = (goodputs or {}).get(label)
        if gp:
            ax.axvline(gp, color=line[0].get_color(), linestyle=":", linewidth=1)
            ax.annotate(f"goodput {gp:.3g}", (gp, 5), rotation=90, fontsize=8,
                        color=line[0].get_color())
    ax.axhline(100 * target, color="gray", linestyle="--", linewidth=1,
               label=f"target {100 * target:g}%")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(0, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def attainment_points(runs: Sequence[dict[str, Any]]) -> list[tuple[float, float]]:
    """(rate, mean attainment) per finite rate, averaging repeated runs at one rate."""
    by_rate: dict[float, list[float]] = {}
    for run in runs:
        rate, att = run.get("rate"), run.get("slo_attainment")
        if att is None or rate_str(rate) == "inf":
            continue
        by_rate.setdefault(float(rate), []).append(att)
    return sorted((r, sum(a) / len(a)) for r, a in by_rate.items())


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

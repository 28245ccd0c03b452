"""Pure statistics for the benchmark: percentiles, SLO attainment, goodput search. No I/O.

Goodput follows DistServe: the highest request rate at which at least `target` of the requests
meet both the TTFT and the TPOT SLO. The search only sees a function rate -> attainment, so it
can be tested on synthetic functions and driven by real benchmark runs alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

PERCENTILES = (50.0, 90.0, 99.0)


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile by linear interpolation between closest ranks (numpy's default).

    Empty input gives nan so a run with no successful requests still reports a row.
    """
    if not 0.0 <= p <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {p}")
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * p / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values) if values else math.nan


def summarize(values: Sequence[float], scale: float = 1.0) -> dict[str, float]:
    """mean, p50, p90, p99, min, max of `values`, each multiplied by `scale` (e.g. 1e3 for ms)."""
    out = {"mean": mean(values) * scale}
    for p in PERCENTILES:
        out[f"p{p:g}"] = percentile(values, p) * scale
    out["min"] = min(values) * scale if values else math.nan
    out["max"] = max(values) * scale if values else math.nan
    return out


def meets_slo(
    ttft: float | None, tpot: float | None, slo_ttft: float | None, slo_tpot: float | None
) -> bool:
    """Whether one request meets both SLOs. ttft None means the request failed (a miss);
    tpot None on a success means a single output token, which has no TPOT to violate.
    An SLO of None is not checked."""
    if ttft is None:
        return False
    if slo_ttft is not None and ttft > slo_ttft:
        return False
    return not (slo_tpot is not None and tpot is not None and tpot > slo_tpot)


def slo_attainment(
    ttfts: Sequence[float | None],
    tpots: Sequence[float | None],
    slo_ttft: float | None,
    slo_tpot: float | None,
) -> float:
    """Fraction of requests meeting both SLOs; failed requests (ttft None) count as misses."""
    if len(ttfts) != len(tpots):
        raise ValueError("ttfts and tpots must have the same length")
    if not ttfts:
        return math.nan
    good = sum(meets_slo(a, b, slo_ttft, slo_tpot) for a, b in zip(ttfts, tpots))
    return good / len(ttfts)


def goodput_from_sweep(
    rates: Sequence[float], attainments: Sequence[float], target: float
) -> float:
    """Highest swept rate that meets `target`, scanning upwards and stopping at the first miss:
    the serving system is assumed monotone, so a pass above a miss is read as noise.
    0.0 when even the lowest rate misses."""
    best = 0.0
    for rate, att in sorted(zip(rates, attainments)):
        if not att >= target:  # nan (no requests) counts as a miss
            break
        best = rate
    return best


@dataclass
class GoodputResult:
    goodput: float  # highest rate found to meet the target; 0.0 if none did
    probes: list[tuple[float, float]] = field(default_factory=list)  # (rate, mean attainment)
    upper_bound: float | None = None  # lowest rate found to miss; None: never missed
    target: float = 0.9

    @property
    def saturated(self) -> bool:
        """True when every probed rate passed, so the true goodput may lie above max_rate."""
        return self.upper_bound is None


def search_goodput(
    attainment: Callable[[float], float],
    target: float = 0.9,
    start_rate: float = 1.0,
    max_rate: float = 256.0,
    min_rate: float = 1.0 / 64,
    rel_tol: float = 0.1,
    max_probes: int = 16,
    repeats: int = 1,
) -> GoodputResult:
    """Find the highest rate whose attainment is >= target.

    First brackets the crossing by doubling from `start_rate` (or halving, if it misses),
    then bisects until the bracket [lo, hi] is within `rel_tol` of hi. Each probe averages
    `repeats` calls, which is what tames a noisy attainment function: every decision is then
    correct wherever the true attainment is further than the noise from the target.
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target must be in (0, 1], got {target}")
    if not 0.0 < min_rate <= start_rate <= max_rate:
        raise ValueError("need 0 < min_rate <= start_rate <= max_rate")
    if repeats < 1 or max_probes < 1:
        raise ValueError("repeats and max_probes must be >= 1")
    result = GoodputResult(goodput=0.0, target=target)

    def passes(rate: float) -> bool:
        att = mean([attainment(rate) for _ in range(repeats)])
        result.probes.append((rate, att))
        return att >= target

    lo, hi = 0.0, None
    rate = start_rate
    if passes(rate):
        lo = rate
        while len(result.probes) < max_probes and rate < max_rate:
            rate = min(rate * 2.0, max_rate)
            if not passes(rate):
                hi = rate
                break
            lo = rate
    else:
        hi = rate
        while len(result.probes) < max_probes and rate > min_rate:
            rate = max(rate / 2.0, min_rate)
            if passes(rate):
                lo = rate
                break
            hi = rate
    if lo > 0.0 and hi is not None:
        while len(result.probes) < max_probes and hi - lo > rel_tol * hi:
            mid = (lo + hi) / 2.0
            if passes(mid):
                lo = mid
            else:
                hi = mid
    result.goodput = lo
    result.upper_bound = hi
    return result

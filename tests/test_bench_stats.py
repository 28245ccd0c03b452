"""bench.stats: percentiles, SLO attainment and the goodput search, on synthetic data."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from bench import stats


def test_percentile_exact_values() -> None:
    data = [50.0, 15.0, 40.0, 20.0, 35.0]  # unsorted on purpose
    assert stats.percentile(data, 0) == 15.0
    assert stats.percentile(data, 50) == 35.0
    assert stats.percentile(data, 40) == pytest.approx(29.0)  # rank 1.6: 20 + 0.6 * 15
    assert stats.percentile(data, 90) == pytest.approx(46.0)  # rank 3.6: 40 + 0.6 * 10
    assert stats.percentile(data, 99) == pytest.approx(49.6)
    assert stats.percentile(data, 100) == 50.0
    assert stats.percentile([7.0], 99) == 7.0
    assert math.isnan(stats.percentile([], 50))
    with pytest.raises(ValueError):
        stats.percentile(data, 101)


def test_percentile_matches_numpy_linear() -> None:
    rng = random.Random(3)
    for n in (2, 3, 10, 101, 1000):
        xs = [rng.expovariate(1.0) for _ in range(n)]
        for p in (1, 25, 50, 90, 99, 99.9):
            assert stats.percentile(xs, p) == pytest.approx(float(np.percentile(xs, p)))


def test_summarize_scales_and_empty() -> None:
    s = stats.summarize([0.001, 0.002, 0.003, 0.004], scale=1e3)
    assert s["mean"] == pytest.approx(2.5)
    assert s["p50"] == pytest.approx(2.5)
    assert s["p90"] == pytest.approx(3.7)
    assert s["min"] == pytest.approx(1.0) and s["max"] == pytest.approx(4.0)
    assert set(s) == {"mean", "p50", "p90", "p99", "min", "max"}
    assert all(math.isnan(v) for v in stats.summarize([]).values())


def test_slo_attainment_counts_failures_and_single_tokens() -> None:
    ttft = [0.10, 0.30, None, 0.20, 0.20]
    tpot = [0.01, 0.01, None, None, 0.05]
    # ok; TTFT miss; failed; 1 token (no TPOT) ok; TPOT miss
    assert stats.slo_attainment(ttft, tpot, 0.25, 0.02) == pytest.approx(2 / 5)
    assert stats.slo_attainment(ttft, tpot, 0.25, None) == pytest.approx(3 / 5)
    assert stats.slo_attainment(ttft, tpot, None, 0.02) == pytest.approx(3 / 5)
    assert stats.slo_attainment(ttft, tpot, None, None) == pytest.approx(4 / 5)
    assert stats.meets_slo(0.25, 0.02, 0.25, 0.02)  # the bounds are inclusive
    assert math.isnan(stats.slo_attainment([], [], 1.0, 1.0))
    with pytest.raises(ValueError):
        stats.slo_attainment([0.1], [], 1.0, 1.0)


def test_goodput_from_sweep_stops_at_first_miss() -> None:
    rates = [4.0, 1.0, 2.0, 8.0, 16.0]
    atts = [0.95, 1.0, 0.99, 0.80, 0.93]  # 16 passing again is noise
    assert stats.goodput_from_sweep(rates, atts, 0.9) == 4.0
    assert stats.goodput_from_sweep([1.0, 2.0], [0.5, 0.4], 0.9) == 0.0
    assert stats.goodput_from_sweep([1.0, 2.0], [1.0, math.nan], 0.9) == 1.0


def _linear_attainment(knee: float, slope: float):
    """1.0 up to `knee`, then falling by `slope` per req/s."""
    return lambda r: min(1.0, max(0.0, 1.0 - slope * max(0.0, r - knee)))


def test_search_monotone_converges_to_crossing() -> None:
    att = _linear_attainment(knee=10.0, slope=0.05)  # crosses 0.9 at r = 12
    res = stats.search_goodput(att, target=0.9, start_rate=1.0, rel_tol=0.01, max_probes=40)
    assert res.upper_bound is not None and not res.saturated
    assert 12.0 * 0.99 <= res.goodput <= 12.0 < res.upper_bound
    assert res.upper_bound - res.goodput <= 0.01 * res.upper_bound
    assert [r for r, _ in res.probes[:5]] == [1.0, 2.0, 4.0, 8.0, 16.0]  # doubling bracket
    assert all(a >= 0.9 for r, a in res.probes if r <= res.goodput)


def test_search_step_function_from_above() -> None:
    calls: list[float] = []

    def att(r: float) -> float:
        calls.append(r)
        return 1.0 if r <= 7.3 else 0.5

    res = stats.search_goodput(att, start_rate=100.0, rel_tol=0.02, max_probes=40)
    assert calls[:5] == [100.0, 50.0, 25.0, 12.5, 6.25]  # halving bracket
    assert 7.3 * 0.98 <= res.goodput <= 7.3 < res.upper_bound


def test_search_never_missing_or_never_passing() -> None:
    res = stats.search_goodput(lambda r: 1.0, start_rate=1.0, max_rate=64.0)
    assert res.saturated and res.goodput == 64.0
    assert [r for r, _ in res.probes] == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]
    res = stats.search_goodput(lambda r: 0.0, start_rate=1.0, min_rate=0.25)
    assert res.goodput == 0.0 and res.upper_bound == 0.25
    assert [r for r, _ in res.probes] == [1.0, 0.5, 0.25]


def test_search_respects_probe_budget() -> None:
    res = stats.search_goodput(_linear_attainment(10.0, 0.05), rel_tol=1e-9, max_probes=7)
    assert len(res.probes) == 7
    assert res.goodput <= 12.0 < res.upper_bound


@pytest.mark.parametrize("seed", range(20))
def test_search_noisy_stays_in_noise_band(seed: int) -> None:
    """With noise of at most `eps`, every pass/miss decision is right outside the band of rates
    where the true attainment is within eps of the target, so the answer lands in that band
    (less the bisection tolerance)."""
    rng = random.Random(seed)
    true = _linear_attainment(knee=10.0, slope=0.05)  # 0.95 at r=11, 0.85 at r=13
    eps, tol = 0.05, 0.05

    def noisy(r: float) -> float:
        return true(r) + rng.uniform(-eps, eps)

    res = stats.search_goodput(noisy, target=0.9, rel_tol=tol, max_probes=40, repeats=3)
    assert 11.0 * (1 - tol) <= res.goodput <= 13.0
    assert len(res.probes) < 40  # converged, not cut off


def test_search_repeats_average_calls() -> None:
    seq = iter([1.0, 0.7, 1.0, 0.9])  # means: 0.85 at 1.0 (miss), then 0.95 at 0.5 (pass)
    res = stats.search_goodput(
        lambda r: next(seq), start_rate=1.0, min_rate=0.25, rel_tol=0.6, repeats=2
    )
    assert res.probes[0] == (1.0, pytest.approx(0.85))
    assert res.probes[1] == (0.5, pytest.approx(0.95))
    assert res.goodput == 0.5 and res.upper_bound == 1.0


def test_search_validates_arguments() -> None:
    with pytest.raises(ValueError):
        stats.search_goodput(lambda r: 1.0, target=0.0)
    with pytest.raises(ValueError):
        stats.search_goodput(lambda r: 1.0, start_rate=10.0, max_rate=5.0)
    with pytest.raises(ValueError):
        stats.search_goodput(lambda r: 1.0, repeats=0)

"""The load generator against a fake streaming server started in the test, with set latencies:
measured TTFT / TPOT / ITL must land within the sleeps the server does plus a small overhead."""

from __future__ import annotations

import pytest

from bench.client import fetch_first_model
from bench.fake_server import FakeConfig, running
from bench.loadgen import ClientConfig, arrival_offsets, run_http
from bench.report import summarize_run
from bench.workloads import WorkloadConfig, build_workload

SLACK = 0.04  # seconds of scheduling and HTTP overhead allowed on top of the server's sleeps


def _specs(n: int, out: int, fmt: str = "ids") -> list:
    cfg = WorkloadConfig("synthetic", num_prompts=n, input_len="16", output_len=str(out),
                         prompt_format=fmt)
    return build_workload(cfg, 0)


def test_ttft_tpot_itl_within_bounds() -> None:
    fake = FakeConfig(ttft_ms=60, tpot_ms=15, model="fake-7b")
    with running(fake) as url:
        assert fetch_first_model(url) == "fake-7b"
        client = ClientConfig(url, model="fake-7b")
        res = run_http(_specs(8, 6), client)
    assert len(res.records) == 8
    for r in res.records:
        assert r.ok, r.error
        assert r.output_tokens == 6 and r.prompt_tokens == 16
        assert 0.06 * 0.95 <= r.ttft <= 0.06 + SLACK
        assert 0.015 * 0.95 <= r.tpot <= 0.015 + SLACK / 4
        assert len(r.itl) == 5
        assert all(0.015 * 0.9 <= x <= 0.015 + SLACK for x in r.itl)
        assert r.e2e == pytest.approx(r.ttft + 5 * r.tpot)
    # rate inf: all sent at once, so the run lasts about one request
    assert res.duration < 0.06 + 5 * 0.015 + 2 * SLACK


@pytest.mark.parametrize("usage", [True, False])
def test_multi_token_chunks(usage: bool) -> None:
    fake = FakeConfig(ttft_ms=30, tpot_ms=10, tokens_per_chunk=3)
    with running(fake) as url:
        res = run_http(_specs(2, 6, fmt="text"), ClientConfig(url, model="m",
                                                               include_usage=usage))
    for r in res.records:
        assert r.ok, r.error
        assert len(r.itl) == 1 and 0.03 * 0.95 <= r.itl[0] <= 0.03 + SLACK  # 3 tokens x 10 ms
        # With usage the 6 tokens are known; without it each chunk counts as one token.
        assert r.output_tokens == (6 if usage else 2)
        expected_tpot = 0.03 / (5 if usage else 1)
        assert expected_tpot * 0.95 <= r.tpot <= expected_tpot + SLACK


def test_closed_loop_concurrency_caps_in_flight() -> None:
    fake = FakeConfig(ttft_ms=40, tpot_ms=10)
    e2e = 0.04 + 3 * 0.01
    with running(fake) as url:
        res = run_http(_specs(6, 4), ClientConfig(url, model="m"), concurrency=2)
    sends = sorted(r.send_time for r in res.records)
    # three waves of two: each wave starts when the previous one finishes
    assert sends[1] < 0.02
    assert e2e * 0.95 <= sends[2] and e2e * 0.95 <= sends[3] < e2e + SLACK
    assert 2 * e2e * 0.95 <= sends[4]
    assert 3 * e2e * 0.95 <= res.duration <= 3 * (e2e + SLACK)


def test_poisson_schedule_is_followed() -> None:
    with running(FakeConfig(ttft_ms=5, tpot_ms=1)) as url:
        res = run_http(_specs(10, 2), ClientConfig(url, model="m"), rate=40.0, seed="s")
    offsets = arrival_offsets(10, 40.0, "s")
    for r, off in zip(res.records, offsets):
        assert off - 0.002 <= r.send_time <= off + 0.02


def test_failures_are_recorded_not_raised() -> None:
    with running(FakeConfig(ttft_ms=5, tpot_ms=1, fail_every=3)) as url:
        res = run_http(_specs(6, 3), ClientConfig(url, model="m"), concurrency=1)
    run = summarize_run(res, slo_ttft_ms=1000, slo_tpot_ms=1000)
    assert run["completed"] == 4 and run["failed"] == 2
    assert run["slo_attainment"] == pytest.approx(4 / 6)  # failures miss the SLO
    assert any("HTTP 500" in e for e in run["errors"])
    assert run["requests"][2]["error"].startswith("HTTP 500")
    # a server that is not there
    res = run_http(_specs(2, 3), ClientConfig("http://127.0.0.1:9", model="m", timeout_s=5))
    assert all(not r.ok and r.error for r in res.records)

"""The load generator against a fake streaming server started in the test, with set latencies:
each chunk arrives no sooner after the send than the server's sleeps before it, and TTFT / ITL add
up to the request's time; requests are in flight together as the schedule says. No bound depends on
how fast the machine is: overheads are printed, not asserted. A single gap (ITL) or the TPOT has no
lower bound of its own: a chunk the client reads late shortens the gap after it."""

from __future__ import annotations

import io

import pytest

from bench.client import fetch_first_model
from bench.fake_server import FakeConfig, running
from bench.loadgen import ClientConfig, arrival_offsets, run_http
from bench.progress import Progress
from bench.report import summarize_run
from bench.workloads import RequestSpec, WorkloadConfig, build_workload


def _specs(n: int, out: int, fmt: str = "ids") -> list:
    cfg = WorkloadConfig("synthetic", num_prompts=n, input_len="16", output_len=str(out),
                         prompt_format=fmt)
    return build_workload(cfg, 0)


def _adds_up(r) -> bool:
    """First token, then the gaps between chunks, then the end of the stream, in that order."""
    return 0 < r.ttft and all(x > 0 for x in r.itl) and r.ttft + sum(r.itl) <= r.e2e + 1e-9


def _arrivals(r) -> list[float]:
    """Seconds from the send to each chunk's arrival."""
    out = [r.ttft]
    for gap in r.itl:
        out.append(out[-1] + gap)
    return out


def _not_before(r, sleeps_s: list[float]) -> bool:
    """Chunk k arrives no sooner than the server's first k+1 sleeps (5% for timer resolution)."""
    due = [sum(sleeps_s[:k + 1]) for k in range(len(sleeps_s))]
    return all(0.95 * d <= t for d, t in zip(due, _arrivals(r), strict=True))


def _max_in_flight(records) -> int:
    """Most requests in flight at once, counted at each send (a request is in flight from its
    send until its last byte)."""
    return max(sum(1 for o in records if o.send_time <= r.send_time < o.send_time + o.e2e)
               for r in records)


def test_ttft_tpot_itl_within_bounds() -> None:
    fake = FakeConfig(ttft_ms=60, tpot_ms=15, model="fake-7b", hold_until=8)
    with running(fake) as url:
        assert fetch_first_model(url) == "fake-7b"
        client = ClientConfig(url, model="fake-7b")
        res = run_http(_specs(8, 6), client)
    assert len(res.records) == 8
    for r in res.records:
        assert r.ok, r.error
        assert r.output_tokens == 6 and r.prompt_tokens == 16
        assert len(r.itl) == 5
        assert _not_before(r, [0.06] + [0.015] * 5)
        assert r.e2e == pytest.approx(r.ttft + 5 * r.tpot)
        assert _adds_up(r)
    print(f"\nTTFT {max(r.ttft for r in res.records) * 1000:.1f} ms at most (server: 60), "
          f"TPOT {max(r.tpot for r in res.records) * 1000:.1f} ms at most (server: 15)")
    # rate inf: all sent at once; the server answers none before all 8 have arrived, so all
    # 8 are in flight together; the run lasts from the first send to the last byte
    assert max(r.send_time for r in res.records) < min(r.send_time + r.ttft for r in res.records)
    assert _max_in_flight(res.records) == 8
    assert max(r.send_time + r.e2e for r in res.records) <= res.duration


@pytest.mark.parametrize("usage", [True, False])
def test_multi_token_chunks(usage: bool) -> None:
    fake = FakeConfig(ttft_ms=30, tpot_ms=10, tokens_per_chunk=3)
    with running(fake) as url:
        res = run_http(_specs(2, 6, fmt="text"), ClientConfig(url, model="m",
                                                               include_usage=usage))
    for r in res.records:
        assert r.ok, r.error
        assert len(r.itl) == 1 and _not_before(r, [0.03, 0.03])  # TTFT, then 3 tokens x 10 ms
        # With usage the 6 tokens are known; without it each chunk counts as one token.
        assert r.output_tokens == (6 if usage else 2)
        assert r.tpot == pytest.approx((r.e2e - r.ttft) / (5 if usage else 1))
        assert _adds_up(r)


def test_closed_loop_concurrency_caps_in_flight() -> None:
    fake = FakeConfig(ttft_ms=40, tpot_ms=10)
    e2e = 0.04 + 3 * 0.01
    with running(fake) as url:
        res = run_http(_specs(6, 4), ClientConfig(url, model="m"), concurrency=2)
    sends = sorted(r.send_time for r in res.records)
    # three waves of two: the first two go at once (both before either is answered), then
    # each request waits for one in flight to finish, so never more than two are in flight
    assert sends[1] < min(r.send_time + r.ttft for r in res.records)
    assert _max_in_flight(res.records) == 2
    assert e2e * 0.95 <= sends[2] and e2e * 0.95 <= sends[3]
    assert 2 * e2e * 0.95 <= sends[4]
    assert 3 * e2e * 0.95 <= res.duration
    print(f"\nwaves sent at {', '.join(f'{t * 1000:.0f}' for t in sends)} ms "
          f"(a request takes {e2e * 1000:.0f} ms at the server)")


def test_poisson_schedule_is_followed() -> None:
    with running(FakeConfig(ttft_ms=5, tpot_ms=1)) as url:
        res = run_http(_specs(10, 2), ClientConfig(url, model="m"), rate=40.0, seed="s")
    offsets = arrival_offsets(10, 40.0, "s")
    # Sent in schedule order, none before its time (less the event loop's timer resolution);
    # how late a send is depends on the machine: printed, not asserted.
    sends = [r.send_time for r in res.records]
    assert sends == sorted(sends)
    for r, off in zip(res.records, offsets):
        assert off - 0.002 <= r.send_time
    late = max(r.send_time - off for r, off in zip(res.records, offsets))
    print(f"\nPoisson schedule: sends at most {late * 1000:.1f} ms late")


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


def test_client_processes_share_the_run() -> None:
    """Two client processes: each takes every other request and half the concurrency, both
    start at one instant, and the records come back in the order of the specs."""
    # No first token before two requests are in: the run ends only if both processes send at
    # once (one after the other, the first would wait out the client's timeout).
    fake = FakeConfig(ttft_ms=40, tpot_ms=10, hold_until=2)
    specs = [RequestSpec(list(range(n)), n, 4) for n in range(10, 16)]
    with running(fake) as url:
        res = run_http(specs, ClientConfig(url, model="m", timeout_s=30), concurrency=2,
                       processes=2)
    assert [r.prompt_tokens for r in res.records] == list(range(10, 16))  # usage, per request
    assert all(r.ok and r.output_tokens == 4 for r in res.records)
    assert _max_in_flight(res.records) == 2
    # process 0 sends requests 0, 2, 4, each when the one before is done
    for a, b in zip(res.records[0::2], res.records[2::2]):
        assert b.send_time >= a.send_time + a.e2e - 1e-3
    # not timing: some CPU was used at all (summed over both processes), and the run's
    # duration (the longest process's) covers every request's send and stream: orderings of
    # one clock, true at any speed
    assert res.client_cpu_s > 0  # not timing
    assert res.duration >= max(r.send_time + r.e2e for r in res.records) - 1e-3  # not timing


def test_client_processes_keep_the_schedule() -> None:
    with running(FakeConfig(ttft_ms=5, tpot_ms=1)) as url:
        res = run_http(_specs(10, 2), ClientConfig(url, model="m"), rate=40.0, seed="s",
                       processes=3)
    for r, off in zip(res.records, arrival_offsets(10, 40.0, "s"), strict=True):
        assert r.ok, r.error
        assert off - 0.002 <= r.send_time


def test_client_processes_fill_the_progress_bar() -> None:
    out = io.StringIO()
    progress = Progress(4, "run", stream=out)
    with running(FakeConfig(ttft_ms=5, tpot_ms=1)) as url:
        run_http(_specs(4, 2), ClientConfig(url, model="m"), concurrency=2, progress=progress,
                 processes=2)
    assert progress.done == 4 and progress.failed == 0
    assert out.getvalue().rstrip().split("\r")[-1].startswith("run [" + "#" * 30 + "] 4/4")

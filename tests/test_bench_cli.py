"""End to end: `bench.serve` and `bench.compare` CLIs against fake servers (in a thread for
serve; as `serve run`-like subprocesses for compare), plus the launcher's failure path."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest

from bench import compare, serve
from bench.fake_server import FakeConfig, running
from bench.launcher import ServerProcess, expand, haproxy_threads, serve_env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Speed independence: the fake server's sleeps are lower bounds on what the client measures, and
# each SLO sits 80 ms or more away from them on both sides. A run "misses" only by sleeps (a
# queue behind one slot); a run "meets" while the machine adds less than ~100 ms per request.
# `--burstiness 1e4` makes arrivals regular (gaps within ~1% of 1/rate; for the seeds here,
# 250 ms at rate 4, 330 ms at rate 3, 168 ms at rate 6), so whether requests overlap is set by
# the rate, not by Poisson luck.


def test_serve_sweep_writes_json_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # One slot held 125 ms per request (5 ms to the first token, 3 more tokens 40 ms apart).
    # At 4 req/s (250 ms apart) no request waits: TTFT is 5 ms plus overhead, under the 150 ms
    # SLO. At 1000 req/s all 4 arrive within 3 ms, so the 3rd and 4th in line get their first
    # token >= 2 x 125 + 5 - 3 ms after they were sent: at most 2 of 4 can meet the SLO.
    with running(FakeConfig(ttft_ms=5, tpot_ms=40, max_concurrency=1, model="fk")) as url:
        rc = serve.main([
            "--base-url", url, "--num-prompts", "4", "--input-len", "uniform:4:8",
            "--output-len", "4", "--sweep-rates", "1000,4", "--burstiness", "1e4",
            "--slo-ttft-ms", "150", "--slo-tpot-ms", "200", "--seed", "1",
            "--out", str(tmp_path / "r.json"), "--plot-dir", str(tmp_path), "--no-progress",
        ])
    assert rc == 0
    out = capsys.readouterr().out
    assert "goodput: 4 req/s at 90% attainment" in out
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["model"] == "fk"  # taken from /v1/models
    assert [r["rate"] for r in res["runs"]] == [4.0, 1000.0]  # sweep runs in increasing rate
    slow, fast = res["runs"]
    assert slow["completed"] == fast["completed"] == 4  # queued requests still complete
    assert slow["slo_attainment"] == 1.0 and fast["slo_attainment"] <= 0.5
    # The client measures at least the server's delays: TTFT >= 5 ms, a whole request >= 5 +
    # 3 x 40 ms, and the last request in line waited for 3 holds (its 5 ms TTFT covers the
    # <= 3 ms it was sent after the first). Not TPOT on its own: a first chunk read late
    # shortens the time from it to the last one.
    assert slow["ttft_ms"]["min"] >= 5 and slow["e2e_ms"]["min"] >= 125
    assert fast["ttft_ms"]["max"] >= 3 * 125
    assert [r["output_tokens"] for r in slow["requests"]] == [4] * 4
    assert res["goodput"] == {
        "method": "sweep", "goodput_rps": 4.0, "target": 0.9, "slo_ttft_ms": 150.0,
        "slo_tpot_ms": 200.0, "points": [[4.0, 1.0], [1000.0, fast["slo_attainment"]]],
        "saturated": False,  # a swept rate missed, so goodput is bounded by the sweep
    }
    for name in ("latency_cdf.png", "slo_attainment.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_serve_records_the_named_server_metrics_after_each_run(tmp_path: Path) -> None:
    with running(FakeConfig(ttft_ms=1, tpot_ms=1, model="fk")) as url:
        rc = serve.main([
            "--base-url", url, "--num-prompts", "3", "--output-len", "2", "--sweep-rates",
            "1000,2000", "--record-metrics", "fake_requests_total,fake_info,absent_metric",
            "--out", str(tmp_path / "r.json"), "--no-progress",
        ])
    assert rc == 0
    runs = json.loads((tmp_path / "r.json").read_text())["runs"]
    assert [r["metrics"] for r in runs] == [
        {"fake_requests_total": 3.0, 'fake_info{model="fk"}': 1.0},
        {"fake_requests_total": 6.0, 'fake_info{model="fk"}': 1.0},
    ]


def test_serve_goodput_search(tmp_path: Path) -> None:
    # One slot held 233 ms per request (5 ms, then 3 tokens 76 ms apart). At 3 req/s (330 ms
    # apart) no request waits, so all meet the 120 ms TTFT SLO. At 6 req/s (168 ms apart) each
    # request waits 65 ms more than the one before: the 4th, sent 504 ms after the first, gets
    # its first token no sooner than 3 x 233 + 5 - 504 = 200 ms, a miss, so attainment <= 0.75.
    # Doubling from 3 thus passes at 3 and misses at 6, and rel-tol 0.6 accepts the bracket
    # [3, 6] without bisecting (a midpoint could sit on the boundary, where speed decides).
    with running(FakeConfig(ttft_ms=5, tpot_ms=76, max_concurrency=1)) as url:
        rc = serve.main([
            "--base-url", url, "--num-prompts", "4", "--input-len", "4", "--output-len", "4",
            "--burstiness", "1e4", "--goodput", "--slo-ttft-ms", "120", "--slo-tpot-ms", "500",
            "--start-rate", "3", "--max-rate", "48", "--rel-tol", "0.6", "--max-probes", "4",
            "--out", str(tmp_path / "g.json"),
        ])
    assert rc == 0
    res = json.loads((tmp_path / "g.json").read_text())
    gp = res["goodput"]
    assert [r["rate"] for r in res["runs"]] == [3.0, 6.0]  # one benchmark run per probe
    miss = res["runs"][1]["slo_attainment"]
    assert miss <= 0.75
    assert gp == {
        "method": "search", "goodput_rps": 3.0, "target": 0.9, "slo_ttft_ms": 120.0,
        "slo_tpot_ms": 500.0, "upper_bound_rps": 6.0, "saturated": False,
        "points": [[3.0, 1.0], [6.0, miss]],
    }


def test_serve_rejects_bad_flags() -> None:
    with pytest.raises(SystemExit):
        serve.main(["--goodput", "--model", "m"])  # no SLO given
    with pytest.raises(SystemExit):
        serve.main(["--input-len", "uniform:9", "--model", "m"])


def test_compare_two_fake_systems(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # Unlimited concurrency, so nothing queues: each system's TTFT is its fake delay plus the
    # machine's overhead. 400 ms can never meet the 200 ms SLO; 5 ms meets it while overhead
    # stays under ~195 ms. The TPOT SLO is met by both (it is checked, not what separates them).
    slow = tmp_path / "colocated.yaml"
    fast = tmp_path / "disaggregated.yaml"
    slow.write_text("fake:\n  ttft_ms: 400\n  tpot_ms: 20\n")
    fast.write_text("fake:\n  ttft_ms: 5\n  tpot_ms: 5\n")
    port = _free_port()
    rc = compare.main([
        str(slow), str(fast), "--launch", f"{{python}} -m bench.fake_server {{config}} "
        f"--port {port}", "--stop-cmd", "none", "--base-url", f"http://127.0.0.1:{port}",
        "--settle", "0", "--ready-timeout", "20", "--log-dir", str(tmp_path / "logs"),
        "--num-prompts", "6", "--input-len", "8", "--output-len", "5", "--request-rate", "50",
        "--slo-ttft-ms", "200", "--slo-tpot-ms", "100", "--out", str(tmp_path / "c.json"),
        "--plot-dir", str(tmp_path), "--no-progress",
    ])
    assert rc == 0
    out = capsys.readouterr().out
    assert "colocated" in out and "disaggregated/colocated" in out
    res = json.loads((tmp_path / "c.json").read_text())
    assert set(res["systems"]) == {"colocated", "disaggregated"} and not res["failures"]
    colo = res["systems"]["colocated"]["runs"][0]
    disagg = res["systems"]["disaggregated"]["runs"][0]
    # Each system ran from its own config: the client measures at least its fake delay.
    assert colo["ttft_ms"]["min"] >= 400 and disagg["ttft_ms"]["min"] >= 5
    # The server sends the last of the 5 tokens no sooner than ttft + 4 tpot after the request,
    # so the client's E2E is at least that. (Not the client's TPOT: a first token read late
    # shortens (last - first) / 4 by as much as the machine was late, 2.92 ms against 5 once.)
    assert colo["e2e_ms"]["min"] >= 400 + 4 * 20 and disagg["e2e_ms"]["min"] >= 5 + 4 * 5
    assert colo["slo_attainment"] == 0.0 and disagg["slo_attainment"] == 1.0
    # Rows hold each system's value and the ratio to the baseline (the first system), computed
    # from the same runs; a baseline of 0 has no ratio.
    rows = {r[0]: r for r in res["comparison"]}
    c50, d50 = colo["ttft_ms"]["p50"], disagg["ttft_ms"]["p50"]
    assert rows["@50 req/s TTFT p50 (ms)"][1:] == [f"{c50:.1f}", f"{d50:.1f}",
                                                  f"{d50 / c50:.2f}x"]
    assert d50 < c50  # disaggregated/colocated < 1x: the faster system shows as faster
    assert rows["@50 req/s SLO attainment"][1:] == ["0.000", "1.000", "-"]
    assert (tmp_path / "compare_latency_cdf.png").exists()
    assert (tmp_path / "logs" / "colocated.log").exists()


def test_launcher_reports_early_exit(tmp_path: Path) -> None:
    launch = [sys.executable, "-c", "print('no such config'); raise SystemExit(3)"]
    server = ServerProcess(launch, "http://127.0.0.1:9/health", tmp_path / "x.log")
    with server, pytest.raises(RuntimeError, match="no such config"):
        server.wait_ready(timeout=10)
    assert server.proc is not None and server.proc.returncode == 3


def test_launcher_refuses_to_start_where_a_server_already_answers(tmp_path: Path) -> None:
    with running(FakeConfig(ttft_ms=1, tpot_ms=1, model="fk")) as url:
        server = ServerProcess([sys.executable, "-c", "pass"], f"{url}/health", tmp_path / "x.log")
        with pytest.raises(RuntimeError, match="answers before this server has started"):
            server.start()
    assert server.proc is None  # nothing launched


def test_expand_fills_placeholders() -> None:
    cmd = expand("{serve} run {config}", "configs/tiny.yaml")
    assert cmd[0].endswith("serve") and cmd[1:] == ["run", "configs/tiny.yaml"]
    assert expand("{python} -m x")[0] == sys.executable


@pytest.mark.parametrize("cpus, threads", [(1, 1), (2, 1), (6, 3), (16, 4), (128, 4)])
def test_haproxy_gets_half_the_cores_as_threads_from_1_to_4(cpus: int, threads: int) -> None:
    assert haproxy_threads(cpus) == threads


def test_the_launcher_starts_serve_as_make_serve_does_unless_told_otherwise(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    launch = [sys.executable, "-c", "import os; print(os.environ['RAY_SERVE_ENABLE_HA_PROXY'],"
              " os.environ['RAY_SERVE_HAPROXY_NBTHREAD'])"]
    monkeypatch.setenv("RAY_SERVE_HAPROXY_NBTHREAD", "3")  # the caller's environment wins
    monkeypatch.delenv("RAY_SERVE_ENABLE_HA_PROXY", raising=False)
    server = ServerProcess(launch, "http://127.0.0.1:9/health", tmp_path / "x.log")
    with server:
        server.proc.wait(timeout=30)
    assert (tmp_path / "x.log").read_text().splitlines()[-1] == "1 3"
    assert serve_env() == {"RAY_SERVE_ENABLE_HA_PROXY": "1",
                           "RAY_SERVE_HAPROXY_NBTHREAD": str(haproxy_threads())}

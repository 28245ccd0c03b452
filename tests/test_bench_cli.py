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
from bench.launcher import ServerProcess, expand


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_sweep_writes_json_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # 2 slots x (30 + 3 * 5) ms per request: ~44 req/s capacity, so 200 req/s must queue.
    with running(FakeConfig(ttft_ms=30, tpot_ms=5, max_concurrency=2, model="fk")) as url:
        rc = serve.main([
            "--base-url", url, "--num-prompts", "8", "--input-len", "uniform:4:8",
            "--output-len", "4", "--sweep-rates", "200,10", "--slo-ttft-ms", "60",
            "--slo-tpot-ms", "20", "--seed", "1", "--out", str(tmp_path / "r.json"),
            "--plot-dir", str(tmp_path), "--no-progress",
        ])
    assert rc == 0
    out = capsys.readouterr().out
    assert "goodput: 10 req/s" in out
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["model"] == "fk"  # taken from /v1/models
    assert [r["rate"] for r in res["runs"]] == [10.0, 200.0]
    slow, fast = res["runs"]
    assert slow["completed"] == 8 and slow["slo_attainment"] == 1.0
    assert fast["slo_attainment"] < 0.9
    assert 30 <= slow["ttft_ms"]["p50"] <= 60 and 5 <= slow["tpot_ms"]["p50"] <= 15
    assert len(slow["requests"]) == 8 and slow["requests"][0]["output_tokens"] == 4
    assert res["goodput"]["goodput_rps"] == 10.0 and res["goodput"]["method"] == "sweep"
    for name in ("latency_cdf.png", "slo_attainment.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_serve_goodput_search(tmp_path: Path) -> None:
    with running(FakeConfig(ttft_ms=10, tpot_ms=2, max_concurrency=1)) as url:
        rc = serve.main([
            "--base-url", url, "--num-prompts", "8", "--input-len", "4", "--output-len", "3",
            "--goodput", "--slo-ttft-ms", "40", "--slo-tpot-ms", "50", "--start-rate", "8",
            "--max-rate", "64", "--max-probes", "4", "--out", str(tmp_path / "g.json"),
        ])
    assert rc == 0
    gp = json.loads((tmp_path / "g.json").read_text())["goodput"]
    assert gp["method"] == "search" and len(gp["points"]) <= 4
    assert [p[0] for p in gp["points"]][:2] == [8.0, 16.0]
    assert 8.0 <= gp["goodput_rps"] <= 64.0


def test_serve_rejects_bad_flags() -> None:
    with pytest.raises(SystemExit):
        serve.main(["--goodput", "--model", "m"])  # no SLO given
    with pytest.raises(SystemExit):
        serve.main(["--input-len", "uniform:9", "--model", "m"])


def test_compare_two_fake_systems(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    slow = tmp_path / "colocated.yaml"
    fast = tmp_path / "disaggregated.yaml"
    slow.write_text("fake:\n  ttft_ms: 60\n  tpot_ms: 8\n")
    fast.write_text("fake:\n  ttft_ms: 20\n  tpot_ms: 4\n")
    port = _free_port()
    rc = compare.main([
        str(slow), str(fast), "--launch", f"{{python}} -m bench.fake_server {{config}} "
        f"--port {port}", "--stop-cmd", "none", "--base-url", f"http://127.0.0.1:{port}",
        "--settle", "0", "--ready-timeout", "20", "--log-dir", str(tmp_path / "logs"),
        "--num-prompts", "6", "--input-len", "8", "--output-len", "5", "--request-rate", "50",
        "--slo-ttft-ms", "40", "--slo-tpot-ms", "10", "--out", str(tmp_path / "c.json"),
        "--plot-dir", str(tmp_path), "--no-progress",
    ])
    assert rc == 0
    out = capsys.readouterr().out
    assert "colocated" in out and "disaggregated/colocated" in out
    res = json.loads((tmp_path / "c.json").read_text())
    assert set(res["systems"]) == {"colocated", "disaggregated"} and not res["failures"]
    colo = res["systems"]["colocated"]["runs"][0]
    disagg = res["systems"]["disaggregated"]["runs"][0]
    assert colo["ttft_ms"]["p50"] >= 60 > disagg["ttft_ms"]["p50"] >= 20
    assert colo["slo_attainment"] == 0.0 and disagg["slo_attainment"] == 1.0
    rows = {r[0]: r for r in res["comparison"]}
    ratio = float(rows["@50 req/s TTFT p50 (ms)"][3].rstrip("x"))
    assert 0.2 < ratio < 0.6
    assert (tmp_path / "compare_latency_cdf.png").exists()
    assert (tmp_path / "logs" / "colocated.log").exists()


def test_launcher_reports_early_exit(tmp_path: Path) -> None:
    launch = [sys.executable, "-c", "print('no such config'); raise SystemExit(3)"]
    server = ServerProcess(launch, "http://127.0.0.1:9/health", tmp_path / "x.log")
    with server, pytest.raises(RuntimeError, match="no such config"):
        server.wait_ready(timeout=10)
    assert server.proc is not None and server.proc.returncode == 3


def test_expand_fills_placeholders() -> None:
    cmd = expand("{serve} run {config}", "configs/tiny.yaml")
    assert cmd[0].endswith("serve") and cmd[1:] == ["run", "configs/tiny.yaml"]
    assert expand("{python} -m x")[0] == sys.executable

"""bench.channel_transfer on CPU (gloo): the payloads arrive intact between two processes and
the report has its figures. How fast is printed by the benchmark, not asserted."""

from __future__ import annotations

from bench.channel_transfer import run


def test_gloo_channel_benchmark_runs_between_two_processes():
    out = run("gloo", mib=4, chunk_mib=1, reps=2)
    assert out["payloads_equal"] is True
    assert (out["backend"], out["payload_mib"], out["reps"]) == ("gloo", 4, 2)
    assert out["channel_gbps"] > 0 and out["copy_gbps"] > 0

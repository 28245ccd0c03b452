"""bench.step_log_report: a step log split into runs at idle gaps, and one run's timeline."""

from __future__ import annotations

import json

from bench import step_log_report


def _step(t: float, actions: int = 0, prefill: int = 0, decode: int = 0, waiting: int = 0,
          step_s: float = 0.01) -> dict:
    return {"t": t, "actions": actions, "step_s": step_s, "waiting": waiting, "running": 4,
            "prefill": prefill, "decode": decode}


LOG = [_step(0.0, actions=1, prefill=8), _step(0.01, decode=1),  # a warm-up
       _step(5.0, actions=4, prefill=32, waiting=2), _step(5.01, decode=4),
       _step(5.02, decode=3), _step(5.03, decode=2), _step(5.04, actions=1, prefill=8, decode=2)]


def test_runs_split_at_idle_gaps_and_the_report_names_what_each_step_ran(tmp_path, capsys):
    assert [len(r) for r in step_log_report.runs(LOG, gap_s=1.0)] == [2, 5]
    path = tmp_path / "steps.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in LOG))
    step_log_report.main([str(path), "--full", "4"])
    assert capsys.readouterr().out.splitlines() == [
        f"2 runs in {path}; run -1:",
        "5 steps in 0.050 s; 2.2 decode rows per step; 5 actions applied",
        "  time: 3 decode-only steps 0.030 s (median 10.00 ms), 2 steps with prompt tokens "
        "0.020 s, between steps 0.000 s (median 0.00 ms)",
        "  step    0 at   0.000 s:   4 actions,    32 prompt tokens,   0 decode rows,   2 left "
        "waiting,   10.0 ms",
        "  ... 2 decode steps below 4 rows",
        "  step    4 at   0.040 s:   1 actions,     8 prompt tokens,   2 decode rows,   0 left "
        "waiting,   10.0 ms"]


def test_request_path_pairs_the_kth_send_with_the_kth_action_applied():
    run = [_step(10.0, actions=2), _step(10.05, decode=2), _step(10.1, actions=1)]
    # sends at 9.99, 9.995 and 10.06: applied at 10.0, 10.0 and 10.1
    assert [round(x, 3) for x in step_log_report.request_path_ms(run, [10.06, 9.99, 9.995])] \
        == [10.0, 5.0, 40.0]


def test_time_split_counts_the_gaps_between_steps():
    run = [_step(0.0, prefill=8, step_s=0.1), _step(0.105, decode=2, step_s=0.004),
           _step(0.111, decode=2, step_s=0.004), _step(0.125, decode=2, step_s=0.006)]
    # gaps 5, 2 and 10 ms
    assert step_log_report.time_split(run) == (
        "  time: 3 decode-only steps 0.014 s (median 4.00 ms), 1 steps with prompt tokens "
        "0.100 s, between steps 0.017 s (median 5.00 ms)")


def test_steps_with_cpu_and_gc_clocks_print_them():
    run = [dict(_step(0.0, actions=1, prefill=8, step_s=0.1), cpu_s=0.02, gc_s=0.005),
           dict(_step(0.105, decode=1, step_s=0.004), cpu_s=0.001, gc_s=0.0)]
    assert step_log_report.time_split(run).endswith("; in steps: cpu 0.021 s, gc 0.005 s")
    assert step_log_report.report(run, full=1)[2].endswith("100.0 ms (cpu 20.0, gc 5.0)")


def test_rounds_timed_on_the_gpu_add_their_device_time():
    run = [dict(_step(0.0, decode=2, step_s=0.004), device_s=0.0035),
           dict(_step(0.005, decode=2), device_s=0.003),
           dict(_step(0.016, decode=2, step_s=0.004), device_s=0.0025)]
    assert step_log_report.time_split(run).endswith(
        "; device time of the steps 0.009 s of 0.020 s")

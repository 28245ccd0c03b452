"""bench.gpu_serve's per-replica summary of the step threads' counters over one run."""

from __future__ import annotations

from bench import gpu_serve

KEY = ("decode", "abcdefgh12")


def _counters(steps: float, step_s: float, round_s: float, action_s: float, device_s: float,
              prefill: float, prefill_steps: float, decode: float) -> dict[str, dict]:
    values = (steps, step_s, round_s, action_s, device_s, prefill, prefill_steps, decode)
    names = (*gpu_serve.STEP_COUNTERS, *gpu_serve.SCHEDULED)
    return {name: {KEY: v} for name, v in zip(names, values, strict=True)}


def test_each_replica_prints_its_mean_step_round_and_device_time(capsys):
    before = _counters(10, 0.1, 0.11, 0.001, 0.09, 0, 0, 100)
    # 200 steps over the run: 2.2 s in Engine.step, 2.4 s of rounds, 2.16 s on the device
    after = _counters(210, 2.3, 2.51, 0.021, 2.25, 4096, 2, 25700)
    gpu_serve.print_step_times(before, after)
    assert capsys.readouterr().out == (
        "step thread decode abcdefgh: 200 steps, 11.00 ms in Engine.step, 1.00 ms between "
        "steps (actions 0.10 ms), 10.80 ms on the device; 2 steps with prompt tokens (2048 "
        "each), 128.0 decode rows per step\n")


def test_a_replica_that_held_its_decode_steps_says_how_often_and_how_long(capsys):
    before = _counters(10, 0.1, 0.11, 0.001, 0.09, 0, 0, 100)
    after = _counters(110, 1.1, 1.21, 0.011, 1.09, 0, 0, 12900)
    before.update({gpu_serve.HOLDS[0]: {KEY: 1}, gpu_serve.HOLDS[1]: {KEY: 0.25}})
    after.update({gpu_serve.HOLDS[0]: {KEY: 7}, gpu_serve.HOLDS[1]: {KEY: 1.5}})
    gpu_serve.print_step_times(before, after)
    assert capsys.readouterr().out.endswith(
        "128.0 decode rows per step; 6 decode holds, 1.250 s held\n")


def test_a_run_total_is_the_counters_growth_over_all_replicas():
    before = {"x_total": {("decode", "a"): 2.0, ("decode", "b"): 1.0}}
    after = {"x_total": {("decode", "a"): 5.0, ("decode", "b"): 4.0}}
    assert gpu_serve.run_total(before, after, "x_total") == 6.0

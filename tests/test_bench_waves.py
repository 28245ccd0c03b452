"""bench.waves: a closed-loop run's requests grouped into waves of `concurrency` sends."""

from __future__ import annotations

import json

import pytest

from bench import waves


def _req(send_s: float, ttft_ms: float, e2e_ms: float, error: str | None = None) -> dict:
    return {"send_s": send_s, "ttft_ms": ttft_ms, "e2e_ms": e2e_ms, "error": error}


# Two clients: wave 1 sent at 0 s, the replacements when those ended (1.0 and 1.5 s).
REQUESTS = [_req(1.5, 100.0, 600.0), _req(0.0, 200.0, 1000.0), _req(0.01, 430.0, 1490.0),
            _req(1.0, 300.0, 1000.0)]


def test_waves_group_sends_in_order_and_give_first_token_and_end_times():
    w1, w2 = waves.waves(REQUESTS, concurrency=2)
    assert (w1["requests"], w1["send_first"], w1["send_last"]) == (2, 0.0, 0.01)
    assert (w1["first_token_p10"], w1["first_token_p50"], w1["first_token_max"]) == \
        pytest.approx((0.224, 0.32, 0.44))
    assert (w1["end_p50"], w1["end_max"]) == (1.25, 1.5)
    assert (w2["send_first"], w2["send_last"], w2["first_token_max"], w2["end_max"]) == \
        (1.0, 1.5, 1.6, 2.1)


def test_main_prints_every_run_and_leaves_failed_requests_out(tmp_path, capsys):
    run = {"label": "pd", "concurrency": 2, "output_throughput": 123.4, "duration_s": 2.1,
           "requests": [*REQUESTS, _req(1.2, 0.0, 5.0, error="HTTP 429")]}
    path = tmp_path / "serve.json"
    path.write_text(json.dumps({"runs": [run]}))
    waves.main([str(path)])
    assert capsys.readouterr().out.splitlines() == [
        "pd, concurrency 2: 123 tok/s in 2.10 s",
        "  wave 1: 2 requests sent 0.00-0.01 s; first token p10/p50/p90/max "
        "0.22/0.32/0.42/0.44 s; end 1.05/1.25/1.45/1.50 s",
        "  wave 2: 2 requests sent 1.00-1.50 s; first token p10/p50/p90/max "
        "1.33/1.45/1.57/1.60 s; end 2.01/2.05/2.09/2.10 s"]


def test_a_waves_decode_pace_is_that_of_the_requests_whose_first_token_came_last():
    # Three clients, 11 tokens each: the first tokens at 0.40, 0.90 and 0.93 s; the last two
    # (within LAST_S of 0.93 s) decode their 10 further tokens in 120 and 100 ms.
    reqs = [{**_req(0.0, 400.0, 1400.0), "output_tokens": 11},
            {**_req(0.0, 900.0, 1020.0), "output_tokens": 11},
            {**_req(0.01, 920.0, 1020.0), "output_tokens": 11}]
    (w,) = waves.waves(reqs, concurrency=3)
    assert w["decode_pace_ms"] == pytest.approx(11.0)  # the median of 12 and 10 ms a token
    assert waves.format_wave(1, w).endswith("; decode pace 11.00 ms/token")
    assert "decode_pace_ms" not in waves.waves(REQUESTS, concurrency=2)[0]  # no token counts


def test_a_run_at_a_request_rate_has_no_waves(tmp_path, capsys):
    path = tmp_path / "rate.json"
    path.write_text(json.dumps({"runs": [{"label": "lp", "concurrency": None,
                                          "requests": REQUESTS}]}))
    waves.main([str(path)])
    assert capsys.readouterr().out == "lp: not a closed loop (no concurrency), no waves\n"

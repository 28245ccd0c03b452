"""bench.hop_report: hop logs of several processes read as one path per request, the client's
sends and the ingress's HTTP arrivals paired by order, and a table per wave; a prefill call made
again counts as its request's."""

from __future__ import annotations

import json

from bench import hop_report

T0 = 1000.0


def _write(path, lines: list[tuple[float, str, str]]) -> None:
    path.write_text("".join(json.dumps({"t": T0 + t, "id": rid, "hop": hop}) + "\n"
                            for t, rid, hop in lines))


def test_waves_of_hops_from_two_processes(tmp_path, capsys):
    # the ingress process: HTTP arrivals under other ids, then the engine ids' calls
    _write(tmp_path / "hops-1.jsonl", [
        (-5.0, "x0", "ingress.http"), (-5.0, "w0", "ingress.call"),  # the warm-up
        (0.010, "x1", "ingress.http"), (0.012, "x2", "ingress.http"),
        (0.020, "a", "ingress.call"), (0.030, "b", "ingress.call"),
        (1.010, "x3", "ingress.http"), (1.020, "c", "ingress.call"),
        (9.0, "x4", "ingress.http"), (9.0, "z", "ingress.call")])  # a later run
    # the serving process
    _write(tmp_path / "hops-2.jsonl", [
        (0.025, "a", "decode.recv"), (0.040, "b", "decode.recv"), (1.030, "c", "decode.recv")])
    reqs = hop_report.read_hops(tmp_path)
    assert reqs["a"] == {"ingress.call": T0 + 0.020, "decode.recv": T0 + 0.025}
    lines = hop_report.report(reqs, T0, 2.0, [0.0, 0.002, 1.0], concurrency=2)
    assert reqs["a"] == {"ingress.call": T0 + 0.020, "decode.recv": T0 + 0.025}  # not changed
    assert lines == [
        "wave 1: 2 requests",
        "  hop                        p10     p50     p90     max   hop p50",
        "  client.send              0.000   0.001   0.002   0.002   ",
        "  ingress.http             0.010   0.011   0.012   0.012       10.0 ms",
        "  ingress.call             0.021   0.025   0.029   0.030       14.0 ms",
        "  decode.recv              0.026   0.032   0.038   0.040        7.5 ms",
        "wave 2: 1 requests",
        "  hop                        p10     p50     p90     max   hop p50",
        "  client.send              1.000   1.000   1.000   1.000   ",
        "  ingress.http             1.010   1.010   1.010   1.010       10.0 ms",
        "  ingress.call             1.020   1.020   1.020   1.020       10.0 ms",
        "  decode.recv              1.030   1.030   1.030   1.030       10.0 ms"]
    client = tmp_path / "serve.json"
    client.write_text(json.dumps({"runs": [{
        "start_unix": T0, "duration_s": 2.0, "concurrency": 2,
        "requests": [{"send_s": s} for s in (0.0, 0.002, 1.0)]}]}))
    hop_report.main([str(tmp_path), "--client", str(client)])
    assert capsys.readouterr().out.splitlines() == lines


def test_a_prefill_call_made_again_counts_as_its_requests(tmp_path):
    _write(tmp_path / "hops-1.jsonl", [
        (0.020, "a", "ingress.call"), (0.025, "a", "decode.recv"),
        (0.026, "a", "decode.prefill_call"), (0.030, "a", "prefill.recv"),  # dropped later
        (0.040, "a-again", "decode.prefill_call"), (0.045, "a-again", "prefill.recv")])
    assert hop_report.read_hops(tmp_path) == {"a": {
        "ingress.call": T0 + 0.020, "decode.recv": T0 + 0.025,
        "decode.prefill_call": T0 + 0.040, "prefill.recv": T0 + 0.045}}


def test_a_span_is_each_waves_median_from_one_hop_to_another(tmp_path, capsys):
    _write(tmp_path / "hops-1.jsonl", [
        (0.010, "a", "ingress.call"), (0.020, "a", "decode.recv"), (0.050, "a", "prefill.recv"),
        (0.012, "b", "ingress.call"), (0.022, "b", "decode.recv"), (0.032, "b", "prefill.recv"),
        (0.014, "c", "ingress.call"), (0.024, "c", "decode.recv")])  # c: no prefill.recv
    client = tmp_path / "serve.json"
    client.write_text(json.dumps({"runs": [{
        "start_unix": T0, "duration_s": 1.0, "concurrency": 3,
        "requests": [{"send_s": s} for s in (0.0, 0.001, 0.002)]}]}))
    hop_report.main([str(tmp_path), "--client", str(client),
                     "--span", "decode.recv", "prefill.recv", "--span", "x", "decode.recv"])
    assert capsys.readouterr().out.splitlines()[-2:] == [
        "  span decode.recv -> prefill.recv: p50 20.0 ms (2 requests)",
        "  span x -> decode.recv: no request passed both"]

"""Serving benchmarks: a streaming load generator (`python -m bench.serve`), goodput search
under TTFT/TPOT SLOs, and a colocated-vs-disaggregated comparison (`python -m bench.compare`).

    bench.workloads  requests of a run (synthetic, shared-prefix, long-prompt), per seed
    bench.client     one streamed /v1/completions request -> a timed RequestRecord
    bench.loadgen    arrival schedules (Poisson / closed loop) and sending a run
    bench.stats      percentiles, SLO attainment, goodput search (pure, no I/O)
    bench.report     run summaries (JSON-ready dicts) and text tables
    bench.plots      latency CDFs and SLO attainment vs rate (PNG)
    bench.launcher   start / health-wait / stop a server subprocess
    bench.fake_server  a fake streaming server with set latencies, for tests and dry runs
"""

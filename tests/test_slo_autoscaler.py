"""The SLO autoscaling policy on traces (simulated time: every tick is one second), and its
Serve adapter over real Ray AutoscalingContext objects built from the replicas' own reports."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from cluster.slo_policy import (
    DecodeMeasures,
    PolicyConfig,
    PrefillMeasures,
    RoleInput,
    decide,
)

CFG = PolicyConfig(ttft_s=0.5, tpot_s=0.05, upscale_threshold=1.0, downscale_threshold=0.5,
                   upscale_after_s=10, downscale_after_s=30, cooldown_s=30, kv_high=0.9,
                   max_total_replicas=None)
IDLE_P = PrefillMeasures(ttft_s=None, queued_prompt_tokens=0, prompt_tokens_per_s=0, window_s=10)
IDLE_D = DecodeMeasures(tpot_s=None, kv_use=0.0, running=0)
Load = Callable[[dict[str, int], int], dict[str, PrefillMeasures | DecodeMeasures]]


def simulate(load: Load, cfg: PolicyConfig = CFG, start: tuple[int, int] = (1, 1),
             bounds: tuple[int, int] = (1, 4), seconds: int = 120,
             ) -> dict[str, list[tuple[int, int]]]:
    """Ticks once a second; replicas start at once. Returns each role's (time, new count)."""
    replicas = {"prefill": start[0], "decode": start[1]}
    state: dict = {}
    changes: dict[str, list[tuple[int, int]]] = {"prefill": [], "decode": []}
    for t in range(seconds):
        measures = load(replicas, t)
        roles = {r: RoleInput(replicas[r], replicas[r], *bounds, measures[r]) for r in replicas}
        d = decide(cfg, roles, state, float(t))
        state = d.state
        if cfg.max_total_replicas is not None:
            assert sum(d.targets.values()) <= cfg.max_total_replicas
        for r, n in d.targets.items():
            assert bounds[0] <= n <= bounds[1]
            if n != replicas[r]:
                changes[r].append((t, n))
        replicas = dict(d.targets)
    return changes


def prompt_heavy(replicas: dict[str, int], t: int) -> dict:
    """Prompts arrive faster than one prefill replica runs them: TTFT 3x the SLO at 1
    replica, at the SLO at 3."""
    n = replicas["prefill"]
    return {"prefill": PrefillMeasures(ttft_s=1.5 / n, queued_prompt_tokens=3000 / n,
                                       prompt_tokens_per_s=6000, window_s=10),
            "decode": DecodeMeasures(tpot_s=0.01, kv_use=0.2, running=4)}


def long_outputs(replicas: dict[str, int], t: int) -> dict:
    """Many long generations: TPOT 2.4x the SLO at 1 decode replica."""
    n = replicas["decode"]
    return {"prefill": PrefillMeasures(ttft_s=0.1, queued_prompt_tokens=0,
                                       prompt_tokens_per_s=500, window_s=10),
            "decode": DecodeMeasures(tpot_s=0.12 / n, kv_use=0.3 / n, running=48)}


def test_prompt_heavy_load_grows_prefill_only():
    changes = simulate(prompt_heavy)
    # Sustained for upscale_after_s (10), then doubled at most; the second step waits out the
    # cool-down (30) and a new window (10); at 3 replicas TTFT is at the SLO: no more.
    assert changes == {"prefill": [(10, 2), (50, 3)], "decode": []}


def test_long_outputs_grow_decode_only():
    changes = simulate(long_outputs)
    assert changes == {"prefill": [], "decode": [(10, 2), (50, 3)]}


def test_both_under_a_budget_most_violated_first():
    def both(replicas: dict[str, int], t: int) -> dict:
        return {"prefill": prompt_heavy(replicas, t)["prefill"],  # pressure 3 at 1 replica
                "decode": long_outputs(replicas, t)["decode"]}  # pressure 2.4 at 1 replica

    cfg = PolicyConfig(**{**CFG.__dict__, "max_total_replicas": 3})
    changes = simulate(both, cfg)
    assert changes == {"prefill": [(10, 2)], "decode": []}
    without_budget = simulate(both)
    assert without_budget == {"prefill": [(10, 2), (50, 3)], "decode": [(10, 2), (50, 3)]}


def test_under_a_full_budget_a_starved_role_takes_a_spare_replica():
    cfg = PolicyConfig(**{**CFG.__dict__, "max_total_replicas": 3})
    roles = {"prefill": RoleInput(2, 2, 1, 4, IDLE_P),  # pressure 0: can spare one
             "decode": RoleInput(1, 1, 1, 4, DecodeMeasures(0.1, 0.2, 8))}  # pressure 2
    d = decide(cfg, roles, {"decode": {"over_since": 0.0}}, now=10.0)
    assert d.targets == {"prefill": 1, "decode": 2}
    assert "gives a replica to decode" in d.reports["prefill"].reason
    # Both changed: both cool down.
    assert d.state["prefill"]["last_change"] == d.state["decode"]["last_change"] == 10.0
    # A neighbour that would land above the SLO with one replica fewer keeps it.
    busy = DecodeMeasures(0.03, 0.2, 8)  # pressure 0.6; 1.2 on one replica fewer
    roles = {"prefill": RoleInput(1, 1, 1, 4, PrefillMeasures(2.0, 100, 100, 10)),
             "decode": RoleInput(2, 2, 1, 4, busy)}
    d = decide(cfg, roles, {"prefill": {"over_since": 0.0}}, now=10.0)
    assert d.targets == {"prefill": 1, "decode": 2}


def test_quiet_load_shrinks_one_replica_at_a_time_to_min():
    changes = simulate(lambda r, t: {"prefill": IDLE_P, "decode": IDLE_D}, start=(3, 3))
    assert changes == {"prefill": [(30, 2), (90, 1)], "decode": [(30, 2), (90, 1)]}
    at_min_2 = simulate(lambda r, t: {"prefill": IDLE_P, "decode": IDLE_D}, start=(3, 3),
                        bounds=(2, 4))
    assert at_min_2 == {"prefill": [(30, 2)], "decode": [(30, 2)]}


def test_moderate_load_does_not_shrink_into_the_slo():
    # TPOT at 0.3x the SLO on 2 replicas: on 1 it would be ~0.6x, above downscale_threshold.
    steady = DecodeMeasures(tpot_s=0.015, kv_use=0.1, running=8)
    changes = simulate(lambda r, t: {"prefill": IDLE_P, "decode": steady}, start=(1, 2))
    assert changes == {"prefill": [], "decode": []}


def test_a_single_noisy_sample_does_not_scale():
    def noisy(replicas: dict[str, int], t: int) -> dict:
        tpot = 0.5 if t == 5 else 0.04  # one spike of 10x the SLO; otherwise 0.8x
        # Over for 9 s, one sample in band, over for 9 s again: the window restarts.
        if 20 <= t < 29 or 30 <= t < 39:
            tpot = 0.06
        return {"prefill": IDLE_P, "decode": DecodeMeasures(tpot, 0.2, 8)}

    assert simulate(noisy, seconds=40) == {"prefill": [], "decode": []}


def test_cool_down_holds_a_role_after_each_change():
    def flip(replicas: dict[str, int], t: int) -> dict:  # overloaded, then idle at once
        tpot = 0.2 if t < 11 else None
        return {"prefill": IDLE_P, "decode": DecodeMeasures(tpot, 0.0, 0)}

    changes = simulate(flip, start=(1, 1))
    # Up at 10; idle from 11, but nothing moves before 10 + cooldown_s, then the down window.
    assert changes["decode"] == [(10, 2), (70, 1)]


def test_max_bounds_an_upscale_and_a_config_out_of_bounds_is_clamped():
    hot = DecodeMeasures(tpot_s=0.5, kv_use=0.5, running=64)  # pressure 10, whatever the count
    changes = simulate(lambda r, t: {"prefill": IDLE_P, "decode": hot}, bounds=(1, 3))
    assert changes["decode"] == [(10, 2), (50, 3)]
    d = decide(CFG, {"decode": RoleInput(5, 5, 1, 3, hot)}, {}, now=0.0)
    assert d.targets == {"decode": 3} and d.reports["decode"].reason == "bounds"


def test_holds_without_measures_or_while_replicas_settle():
    hot = DecodeMeasures(tpot_s=0.5, kv_use=0.5, running=64)
    state = {"decode": {"over_since": 0.0}}
    d = decide(CFG, {"decode": RoleInput(2, 1, 1, 4, hot)}, state, now=100.0)
    assert d.targets == {"decode": 2} and d.reports["decode"].reason.startswith("replicas")
    assert d.state["decode"]["over_since"] is None  # the window restarts once they are up
    d = decide(CFG, {"decode": RoleInput(2, 2, 1, 4, None)}, state, now=100.0)
    assert d.targets == {"decode": 2} and d.reports["decode"].reason == "no measures yet"


def test_ttft_counts_against_prefill_only_while_prefill_has_work():
    # TTFT 4x the SLO, prefill idle, decode's KV pool full: decode is the bottleneck.
    roles = {"prefill": RoleInput(1, 1, 1, 4, PrefillMeasures(2.0, 0, 1000, 10)),
             "decode": RoleInput(1, 1, 1, 4, DecodeMeasures(0.01, 0.99, 30))}
    d = decide(CFG, roles, {"prefill": {"over_since": 0.0}, "decode": {"over_since": 0.0}},
               now=10.0)
    assert d.targets == {"prefill": 1, "decode": 2}
    assert d.reports["prefill"].pressure == 0.0
    assert d.reports["decode"].pressure == pytest.approx(1.1)
    # No prefill throughput in the window but prompts queued: the wait is at least the window.
    stuck = PrefillMeasures(ttft_s=None, queued_prompt_tokens=512, prompt_tokens_per_s=0,
                            window_s=10)
    assert stuck.queue_wait_s == 10


# -- the Serve adapter -------------------------------------------------------------------------
def replica_reports(role: str, seconds: range, local_ttft: float | None = None,
                    ) -> list[tuple[float, dict[str, float]]]:
    """What one replica's `record_autoscaling_stats` returns every 2 s under a steady load:
    decode streams at TPOT 125 ms (2.5x a 50 ms SLO) with TTFT 250 ms, and with `local_ttft`
    also prompts it prefills itself at that TTFT; prefill runs 1000 prompt tokens every 2 s."""
    from engine.metrics import LOCAL_PREFILL_TTFT, EngineStats, Metrics
    from serving.replica import autoscaling_stats

    metrics, out = Metrics(role, "r0"), []
    for t in seconds:
        if role == "decode":
            metrics.observe("pdserve_ttft_seconds", 0.25)
            if local_ttft is not None:
                metrics.observe("pdserve_ttft_seconds", local_ttft)
                metrics.observe(LOCAL_PREFILL_TTFT, local_ttft)
            for _ in range(8):
                metrics.observe("pdserve_time_per_output_token_seconds", 0.125)
        else:
            metrics.inc("pdserve_prompt_tokens_total", 1000)
        stats = EngineStats(pages_total=100, pages_used=30 if role == "decode" else 0,
                            pages_cached=0, num_running=8 if role == "decode" else 0,
                            num_waiting=0, num_preemptions=0, num_cascade_steps=0,
                            num_cascade_tokens=0)
        out.append((float(t), autoscaling_stats(stats, metrics, queued_prompt_tokens=0)))
    return out


def contexts(cfg, now: float, state: dict, replicas: dict[str, int],
             reported: bool = True, local_ttft: float | None = None) -> dict:
    """Real Ray AutoscalingContexts, as the controller builds them over the last 10 s."""
    from ray.serve._private.common import DeploymentID, ReplicaID, TimeStampedValue
    from ray.serve.config import AutoscalingConfig, AutoscalingContext

    from cluster.slo_autoscaler import autoscaling_config

    out = {}
    for role in ("prefill", "decode"):
        dep = DeploymentID(name=role, app_name="pd")
        rid = ReplicaID(unique_id=f"{role}-0", deployment_id=dep)
        reports = replica_reports(role, range(int(now) - 8, int(now) + 1, 2), local_ttft)
        raw = {name: {rid: [TimeStampedValue(t, r[name]) for t, r in reports]}
               for name in reports[0][1] if reported}
        agg = {name: {rid: sum(p.value for p in s[rid]) / len(s[rid])} for name, s in raw.items()}
        out[dep] = AutoscalingContext(
            deployment_id=dep, deployment_name=role, app_name="pd",
            current_num_replicas=replicas[role], target_num_replicas=replicas[role],
            running_replicas=[rid], total_num_requests=8.0, total_queued_requests=0.0,
            aggregated_metrics=agg, raw_metrics=raw, capacity_adjusted_min_replicas=1,
            capacity_adjusted_max_replicas=3, policy_state=state.get(dep, {}),
            last_scale_up_time=None, last_scale_down_time=None, current_time=now,
            config=AutoscalingConfig(**autoscaling_config(cfg, role)))
    return out


def test_adapter_reads_the_replica_reports_and_scales_decode_through_serve_wrapper(monkeypatch):
    pytest.importorskip("ray")
    from ray.serve.autoscaling_policy import _apply_app_level_autoscaling_config

    from api.prometheus import render
    from cluster.slo_autoscaler import measures, slo_policy
    from serving.config import AppConfig

    cfg = AppConfig.from_args({"slo": {"ttft_ms": 500, "tpot_ms": 50},
                               "autoscaler": {"enabled": True, "upscale_after_s": 4,
                                              "decode": {"max_replicas": 3}}})
    ctxs = contexts(cfg, 10.0, {}, {"prefill": 1, "decode": 1})
    by_name = {dep.name: (dep, ctx) for dep, ctx in ctxs.items()}
    decode_ctx = by_name["decode"][1]
    assert measures("decode", decode_ctx, None) == DecodeMeasures(tpot_s=0.125, kv_use=0.3,
                                                                   running=8.0)
    assert measures("prefill", by_name["prefill"][1], decode_ctx) == PrefillMeasures(
        ttft_s=0.25, queued_prompt_tokens=0.0, prompt_tokens_per_s=500.0, window_s=10.0)

    # Serve wraps an application-level policy (bounds, its own delays: 0 here) and keeps its
    # returned state per deployment for the next tick.
    policy = _apply_app_level_autoscaling_config(slo_policy)
    published: list[dict] = []
    monkeypatch.setattr("cluster.slo_autoscaler._publish", published.append)
    targets, state = policy(ctxs)
    assert {d.name: n for d, n in targets.items()} == {"prefill": 1, "decode": 1}  # not yet
    targets, state = policy(contexts(cfg, 14.0, state, {"prefill": 1, "decode": 1}))
    assert {d.name: n for d, n in targets.items()} == {"prefill": 1, "decode": 2}
    # /metrics shows the decision, the measures behind it and the changes made
    text = render([published[-1]])
    assert 'pdserve_autoscaler_target_replicas{role="autoscaler",replica="pd",' \
        'target_role="decode"} 2' in text
    assert 'pdserve_autoscaler_pressure{role="autoscaler",replica="pd",' \
        'target_role="decode"} 2.5' in text
    assert 'pdserve_autoscaler_measure{role="autoscaler",replica="pd",target_role="decode",' \
        'measure="tpot_s"} 0.125' in text
    assert 'pdserve_autoscaler_changes_total{role="autoscaler",replica="pd",' \
        'target_role="decode",direction="up"} 1' in text
    decode_state = state[by_name["decode"][0]]
    assert decode_state["pdserve_slo"]["last_change"] == 14.0
    assert decode_state["report"]["pressure"] == 2.5
    # Next tick, the new replica is starting: hold.
    targets, _ = policy(contexts(cfg, 16.0, state, {"prefill": 1, "decode": 2}))
    assert {d.name: n for d, n in targets.items()} == {"prefill": 1, "decode": 2}


def test_prefill_is_charged_the_ttft_of_the_prompts_prefill_replicas_ran_only():
    """A decode replica's own prefills (decode.local_prefill_max_tokens) are in its TTFT
    histogram, which /metrics shows whole, but no prefill replica ran them."""
    pytest.importorskip("ray")
    from cluster.slo_autoscaler import _window_mean, measures
    from serving.config import AppConfig

    cfg = AppConfig.from_args({"slo": {"ttft_ms": 500, "tpot_ms": 50},
                               "autoscaler": {"enabled": True}})
    ctxs = {dep.name: ctx for dep, ctx in contexts(cfg, 10.0, {}, {"prefill": 1, "decode": 1},
                                                   local_ttft=0.05).items()}
    # a first token at 0.25 s and one at 0.05 s a report: 0.15 s on average, 0.25 remotely
    assert _window_mean(ctxs["decode"].raw_metrics, "pdserve_ttft_seconds") == \
        pytest.approx(0.15)
    assert measures("prefill", ctxs["prefill"], ctxs["decode"]).ttft_s == pytest.approx(0.25)


def test_adapter_holds_before_any_report_and_without_the_app_level_policy():
    pytest.importorskip("ray")
    from cluster.slo_autoscaler import hold_without_app_policy, measures, slo_policy
    from serving.config import AppConfig

    cfg = AppConfig.from_args({"slo": {"ttft_ms": 500, "tpot_ms": 50},
                               "autoscaler": {"enabled": True}})
    ctxs = contexts(cfg, 10.0, {}, {"prefill": 1, "decode": 1}, reported=False)
    for ctx in ctxs.values():
        assert measures(ctx.deployment_name, ctx, None) is None
    targets, state = slo_policy(ctxs)
    assert set(targets.values()) == {1}
    assert {s["report"]["reason"] for s in state.values()} == {"no measures yet"}
    ctx = next(iter(ctxs.values()))
    assert hold_without_app_policy(ctx) == (1, {"warned": True})
    assert slo_policy({}) == ({}, {})

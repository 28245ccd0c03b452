"""The SLO autoscaler as Ray Serve 2.60 runs it: an application-level autoscaling policy.

Serve's controller calls `slo_policy(contexts)` on each control-loop tick with one
`AutoscalingContext` per autoscaled deployment (here: prefill and decode). This module only
reads the replicas' reports out of the contexts and calls the pure decision
(cluster/slo_policy.py); see docs/autoscaling.md.

Serve takes an application-level policy only from its config file, not from `build_app`:

    applications:
      - import_path: cluster.app:build_app
        autoscaling_policy: {policy_function: cluster.slo_autoscaler:slo_policy}
        args: {slo: {ttft_ms: ..., tpot_ms: ...}, autoscaler: {enabled: true}, ...}

`build_app` gives prefill and decode an `autoscaling_config` (bounds, Serve's own delays off:
the policy has its own windows) whose deployment-level policy, `hold_without_app_policy`, keeps
the replica count and says why, and whose `policy_kwargs` carry the policy's settings from
the app args, so that the YAML states them once. Serve logs that the application-level policy
takes precedence over it; that is the intent.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from cluster.slo_policy import (
    ROLES,
    Decision,
    DecodeMeasures,
    PolicyConfig,
    PrefillMeasures,
    RoleInput,
    decide,
)
from engine.metrics import LOCAL_PREFILL_TTFT
from serving.config import AppConfig

if TYPE_CHECKING:
    from ray.serve.config import AutoscalingContext

log = logging.getLogger("ray.serve")
POLICY_FUNCTION = "cluster.slo_autoscaler:slo_policy"
STATE_KEY = "pdserve_slo"  # our part of each deployment's policy state (Serve keeps its own)
CHANGES_KEY = "pdserve_changes"  # replica-count changes made so far, by direction


# -- the app side: what build_app gives the two deployments ---------------------------------
def policy_config(cfg: AppConfig) -> PolicyConfig:
    a, slo = cfg.autoscaler, cfg.slo
    assert slo.ttft_ms is not None and slo.tpot_ms is not None  # AppConfig checks it
    return PolicyConfig(
        ttft_s=slo.ttft_ms / 1000, tpot_s=slo.tpot_ms / 1000,
        upscale_threshold=a.upscale_threshold, downscale_threshold=a.downscale_threshold,
        upscale_after_s=a.upscale_after_s, downscale_after_s=a.downscale_after_s,
        cooldown_s=a.cooldown_s, kv_high=a.kv_high, max_total_replicas=a.max_total_replicas)


def autoscaling_config(cfg: AppConfig, role: str) -> dict[str, Any]:
    """Serve's `autoscaling_config` for the `role` deployment when the autoscaler is on."""
    a = cfg.autoscaler
    bounds = getattr(a, role)
    return {
        "min_replicas": bounds.min_replicas, "max_replicas": bounds.max_replicas,
        "initial_replicas": getattr(cfg, role).num_replicas,
        # Serve applies these after any policy; the SLO policy has its own windows.
        "upscale_delay_s": 0.0, "downscale_delay_s": 0.0,
        "look_back_period_s": a.look_back_period_s, "metrics_interval_s": a.metrics_interval_s,
        "policy": {"policy_function": "cluster.slo_autoscaler:hold_without_app_policy",
                   "policy_kwargs": {"role": role,
                                     "policy": dataclasses.asdict(policy_config(cfg))}},
    }


# -- the controller side --------------------------------------------------------------------
def hold_without_app_policy(ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
    """The deployment-level policy: runs only if the Serve config lacks the application-level
    one. Keeps the replica count (rather than Serve's queue-length default) and says so."""
    if not ctx.policy_state.get("warned"):
        log.warning("pdserve autoscaler is enabled but the application has no "
                    "autoscaling_policy; add `autoscaling_policy: {policy_function: %s}` to "
                    "the application in the Serve config. Holding %s at %d replicas.",
                    POLICY_FUNCTION, ctx.deployment_name, ctx.target_num_replicas)
    return ctx.target_num_replicas, {"warned": True}


def slo_policy(contexts: Mapping[Any, AutoscalingContext],
               ) -> tuple[dict[Any, int], dict[Any, dict[str, Any]]]:
    """Serve's application-level policy: {deployment id: context} -> (targets, state)."""
    by_role: dict[str, tuple[Any, AutoscalingContext]] = {}
    settings: dict[str, Any] | None = None
    for dep_id, ctx in contexts.items():
        kwargs = _policy_kwargs(ctx)
        if kwargs.get("role") in ROLES:
            by_role[kwargs["role"]] = (dep_id, ctx)
            settings = kwargs["policy"]
    if settings is None:
        return {}, {}
    cfg = PolicyConfig(**settings)
    now = max((ctx.current_time or time.time()) for _, ctx in by_role.values())
    decode_ctx = by_role["decode"][1] if "decode" in by_role else None
    inputs = {role: RoleInput(replicas=ctx.target_num_replicas, running=ctx.current_num_replicas,
                              min_replicas=ctx.capacity_adjusted_min_replicas,
                              max_replicas=ctx.capacity_adjusted_max_replicas,
                              measures=measures(role, ctx, decode_ctx))
              for role, (_, ctx) in by_role.items()}
    state = {role: ctx.policy_state.get(STATE_KEY) or {} for role, (_, ctx) in by_role.items()}
    decision = decide(cfg, inputs, state, now)
    changes = {role: dict(ctx.policy_state.get(CHANGES_KEY) or {"up": 0, "down": 0})
               for role, (_, ctx) in by_role.items()}
    for role, rep in decision.reports.items():
        if rep.target != inputs[role].replicas:
            changes[role]["up" if rep.target > inputs[role].replicas else "down"] += 1
            log.info("pdserve autoscaler: %s %d -> %d replicas (%s); measures %s", role,
                     inputs[role].replicas, rep.target, rep.reason, rep.measures)
    app = next(iter(by_role.values()))[1].app_name or ""
    _publish(metrics_snapshot(app, decision, changes))
    targets = {dep_id: decision.targets[role] for role, (dep_id, _) in by_role.items()}
    new_state = {dep_id: {STATE_KEY: decision.state[role], CHANGES_KEY: changes[role],
                          "report": dataclasses.asdict(decision.reports[role])}
                 for role, (dep_id, _) in by_role.items()}
    return targets, new_state


def metrics_snapshot(app: str, decision: Decision, changes: Mapping[str, Mapping[str, int]],
                     ) -> dict[str, Any]:
    """The decision as a metrics-hub snapshot (api/prometheus.py renders it on `/metrics`):
    target replicas and pressure per role, the measures it used, the changes made so far."""
    measures = [({"target_role": role, "measure": name}, value)
                for role, rep in sorted(decision.reports.items())
                for name, value in sorted(rep.measures.items()) if value is not None]
    return {"role": "autoscaler", "replica": app or "app", "gauges": {
        "pdserve_autoscaler_target_replicas": [
            ({"target_role": role}, target) for role, target in sorted(decision.targets.items())],
        "pdserve_autoscaler_pressure": [
            ({"target_role": role}, rep.pressure) for role, rep in sorted(decision.reports.items())
            if rep.pressure is not None],
        "pdserve_autoscaler_measure": measures},
        "counters": {"pdserve_autoscaler_changes_total": [
            ({"target_role": role, "direction": d}, n)
            for role, by_dir in sorted(changes.items()) for d, n in sorted(by_dir.items())]}}


def _publish(snapshot: dict[str, Any]) -> None:
    """To the metrics hub, fire and forget: metrics must never stall the control loop."""
    try:
        import ray

        from serving.metrics_hub import get_hub

        if ray.is_initialized():  # in Serve's controller; a unit test must not start Ray
            get_hub().push.remote(snapshot)
    except Exception:  # no hub reachable (Ray shutting down)
        log.debug("autoscaler metrics not published", exc_info=True)


def _policy_kwargs(ctx: AutoscalingContext) -> dict[str, Any]:
    policy = getattr(ctx.config, "policy", None)
    return dict(getattr(policy, "policy_kwargs", None) or {})


def measures(role: str, ctx: AutoscalingContext, decode_ctx: AutoscalingContext | None,
             ) -> PrefillMeasures | DecodeMeasures | None:
    """A role's measures over Serve's look-back window, from its replicas' reports
    (serving/replica.py `autoscaling_stats`); None until one has reported."""
    gauges = ctx.aggregated_metrics or {}  # name -> replica -> mean over the window
    raw = ctx.raw_metrics or {}  # name -> replica -> [(timestamp, value)] over the window
    if "pdserve_kv_use" not in gauges or not gauges["pdserve_kv_use"]:
        return None
    if role == "prefill":
        ttft = None
        if decode_ctx is not None:  # the first token is streamed, and timed, at decode;
            # the prompts a decode replica prefilled itself did not wait for prefill replicas
            ttft = _window_mean(decode_ctx.raw_metrics or {}, "pdserve_ttft_seconds",
                                without=LOCAL_PREFILL_TTFT)
        return PrefillMeasures(
            ttft_s=ttft,
            queued_prompt_tokens=sum(gauges.get("pdserve_queued_prompt_tokens", {}).values()),
            prompt_tokens_per_s=_window_rate(raw, "pdserve_prompt_tokens_total"),
            window_s=float(getattr(ctx.config, "look_back_period_s", 0.0) or 0.0))
    return DecodeMeasures(
        tpot_s=_window_mean(raw, "pdserve_time_per_output_token_seconds"),
        # The busiest replica: the one whose full pool makes new requests wait for pages.
        kv_use=max(gauges["pdserve_kv_use"].values()),
        running=sum(gauges.get("pdserve_num_running", {}).values()))


def _deltas(series_by_replica: Mapping[Any, Any]) -> dict[Any, tuple[float, float]]:
    """Per replica, (increase, seconds) of a running total over the window. A replica with
    one report so far has no increase to show yet."""
    out = {}
    for replica, series in series_by_replica.items():
        points = sorted(series, key=lambda p: p.timestamp)
        if len(points) >= 2:
            out[replica] = (max(0.0, points[-1].value - points[0].value),
                            points[-1].timestamp - points[0].timestamp)
    return out


def _window_mean(raw: Mapping[str, Mapping[Any, Any]], histogram: str,
                 without: str | None = None) -> float | None:
    """The histogram's mean over the window, all replicas: increase of sum / of count; with
    `without`, of the observations not also in that histogram (a subset of this one's)."""
    def increase(name: str, part: str) -> float:
        return sum(d for d, _ in _deltas(raw.get(f"{name}_{part}", {})).values())

    total, count = increase(histogram, "sum"), increase(histogram, "count")
    if without is not None:
        total, count = total - increase(without, "sum"), count - increase(without, "count")
    return total / count if count > 0 else None


def _window_rate(raw: Mapping[str, Mapping[Any, Any]], counter: str) -> float:
    """Per second over the window, summed over replicas."""
    return sum(d / s for d, s in _deltas(raw.get(counter, {})).values() if s > 0)

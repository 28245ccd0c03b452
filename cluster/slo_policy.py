"""The SLO autoscaling decision: prefill and decode replica counts from live measures.

Plain data in, plain data out (no Ray): `decide(cfg, roles, state, now)`. The Serve adapter
(cluster/slo_autoscaler.py) turns the replicas' reports into `RoleInput`s and calls it on
every control-loop tick.

Each role gets one number, its *pressure*: how far its SLO measure is from the target, as a
fraction of the SLO (1.0 = exactly at the SLO).
- prefill: TTFT and the estimated prefill queue wait against `slo.ttft_ms`. TTFT is measured
  where the first token is streamed (the decode replicas), so it counts against prefill only
  while prefill has work queued; otherwise the time went elsewhere. Prompts a decode replica
  prefilled itself (`decode.local_prefill_max_tokens`) are left out of it.
- decode: TPOT against `slo.tpot_ms`, and KV use against `kv_high` (a full KV pool makes new
  requests wait for pages, which shows up as TTFT, not TPOT).

Hysteresis: a role scales up only after its pressure stayed above `upscale_threshold` for
`upscale_after_s`, and down (one replica at a time) only after its pressure *projected onto
one replica fewer* stayed below `downscale_threshold` for `downscale_after_s`. Projecting
keeps a scale-down from landing straight above the up threshold (flapping). After a change,
a role holds for `cooldown_s` and while its replicas start or stop, since the window's
measures still describe the old replica count.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

ROLES = ("prefill", "decode")


@dataclass(frozen=True)
class PolicyConfig:
    """The policy's settings: `slo:` and `autoscaler:` of the app config (serving/config.py,
    where their defaults and meanings are written, once), in seconds."""

    ttft_s: float
    tpot_s: float
    upscale_threshold: float
    downscale_threshold: float
    upscale_after_s: float
    downscale_after_s: float
    cooldown_s: float
    kv_high: float
    max_total_replicas: int | None  # the budget shared by prefill + decode; None: no cap


@dataclass(frozen=True)
class PrefillMeasures:
    """Over the look-back window, summed over the prefill replicas."""

    ttft_s: float | None  # mean TTFT at the decode replicas; None: no first token in the window
    queued_prompt_tokens: float  # prompt tokens waiting or being prefilled
    prompt_tokens_per_s: float  # prompt tokens prefilled per second
    window_s: float  # how long the window is

    @property
    def queue_wait_s(self) -> float:
        """Little's law: the time the queue takes to drain at the measured rate."""
        if self.queued_prompt_tokens <= 0:
            return 0.0
        if self.prompt_tokens_per_s <= 0:
            return self.window_s  # nothing drained over the whole window: at least that long
        return self.queued_prompt_tokens / self.prompt_tokens_per_s


@dataclass(frozen=True)
class DecodeMeasures:
    tpot_s: float | None  # mean time per output token; None: no token in the window
    kv_use: float  # fraction of KV pages in use (the busiest decode replica)
    running: float  # requests in the decode batches, all replicas (reported, not decided on)


@dataclass(frozen=True)
class RoleInput:
    replicas: int  # the current target
    running: int  # replicas up and serving
    min_replicas: int
    max_replicas: int
    measures: PrefillMeasures | DecodeMeasures | None  # None: nothing reported yet


@dataclass
class RoleState:
    """Kept between ticks (Serve stores it as a plain dict per deployment)."""

    over_since: float | None = None
    under_since: float | None = None
    last_change: float | None = None

    @staticmethod
    def from_dict(d: dict[str, Any] | None) -> RoleState:
        return RoleState(**(d or {}))


@dataclass(frozen=True)
class RoleReport:
    target: int
    pressure: float | None
    reason: str
    measures: dict[str, float | None] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    targets: dict[str, int]
    state: dict[str, dict[str, Any]]  # per role, RoleState as a dict
    reports: dict[str, RoleReport]


def pressure(cfg: PolicyConfig, m: PrefillMeasures | DecodeMeasures) -> float:
    if isinstance(m, PrefillMeasures):
        ttft = m.ttft_s if m.ttft_s is not None and m.queued_prompt_tokens > 0 else 0.0
        return max(m.queue_wait_s, ttft) / cfg.ttft_s
    tpot = (m.tpot_s or 0.0) / cfg.tpot_s
    return max(tpot, m.kv_use / cfg.kv_high)


def projected_down(p: float, n: int) -> float:
    """Pressure on n - 1 replicas, if the load spreads evenly (an over-estimate for TPOT,
    which has a floor at small batches: erring toward keeping a replica)."""
    return p * n / (n - 1) if n > 1 else math.inf


def decide(cfg: PolicyConfig, roles: dict[str, RoleInput], state: dict[str, dict[str, Any]],
           now: float) -> Decision:
    states = {r: RoleState.from_dict(state.get(r)) for r in roles}
    pressures = {r: None if inp.measures is None else pressure(cfg, inp.measures)
                 for r, inp in roles.items()}
    wants, reasons = {}, {}
    for r, inp in roles.items():
        wants[r], reasons[r] = _want(cfg, inp, pressures[r], states[r], now)
    if cfg.max_total_replicas is not None:
        _fit_budget(cfg, roles, pressures, states, wants, reasons, now)
    for r, inp in roles.items():
        if wants[r] != inp.replicas:
            states[r] = RoleState(last_change=now)
    return Decision(
        targets=wants, state={r: dataclasses.asdict(s) for r, s in states.items()},
        reports={r: RoleReport(wants[r], pressures[r], reasons[r], _flat(roles[r].measures))
                 for r in roles})


def _want(cfg: PolicyConfig, inp: RoleInput, p: float | None, st: RoleState,
          now: float) -> tuple[int, str]:
    """The role's own wish, ignoring the budget; updates its sustain windows in `st`."""
    n = inp.replicas
    if n < inp.min_replicas or n > inp.max_replicas:
        return min(max(n, inp.min_replicas), inp.max_replicas), "bounds"
    hold = None
    if p is None:
        hold = "no measures yet"
    elif inp.running != n:
        hold = f"replicas settling ({inp.running} running of {n})"
    elif st.last_change is not None and now - st.last_change < cfg.cooldown_s:
        hold = "cool-down"
    if hold is not None:
        st.over_since = st.under_since = None  # windows start once the measures are current
        return n, hold
    assert p is not None
    if p > cfg.upscale_threshold:
        st.under_since = None
        st.over_since = now if st.over_since is None else st.over_since
        if n >= inp.max_replicas:
            return n, f"pressure {p:.2f} over, at max"
        if now - st.over_since < cfg.upscale_after_s:
            return n, f"pressure {p:.2f} over for {now - st.over_since:.0f}s"
        # Aim for the threshold as if load per replica scaled linearly; at most double.
        target = max(n + 1, min(2 * n, math.ceil(n * p / cfg.upscale_threshold)))
        return min(target, inp.max_replicas), f"pressure {p:.2f} > {cfg.upscale_threshold}"
    st.over_since = None
    if n > inp.min_replicas and projected_down(p, n) < cfg.downscale_threshold:
        st.under_since = now if st.under_since is None else st.under_since
        if now - st.under_since < cfg.downscale_after_s:
            return n, f"pressure {p:.2f} under for {now - st.under_since:.0f}s"
        return n - 1, f"pressure {p:.2f}, {projected_down(p, n):.2f} on {n - 1}"
    st.under_since = None
    return n, f"pressure {p:.2f} within band"


def _fit_budget(cfg: PolicyConfig, roles: dict[str, RoleInput],
                pressures: dict[str, float | None], states: dict[str, RoleState],
                wants: dict[str, int], reasons: dict[str, str], now: float) -> None:
    """Cut the wishes to `max_total_replicas`, the most violated role served first; a role
    that gets nothing may take one replica from a role that can spare it."""
    budget = cfg.max_total_replicas
    assert budget is not None
    if sum(wants.values()) <= budget:
        return
    asked = dict(wants)
    for r in roles:  # nobody grows until the grants below
        wants[r] = max(min(wants[r], roles[r].replicas), roles[r].min_replicas)
    by_pressure = sorted(roles, key=lambda r: pressures[r] or 0.0, reverse=True)
    for r in reversed(by_pressure):  # above the budget already (it was lowered): shed
        while sum(wants.values()) > budget and wants[r] > roles[r].min_replicas:
            wants[r] -= 1
            reasons[r] = "over budget"
    for r in by_pressure:
        left = budget - sum(wants.values())
        if asked[r] > wants[r]:
            grant = max(0, min(asked[r] - wants[r], left))
            reasons[r] += f"; budget {budget}: granted {grant} of {asked[r] - roles[r].replicas}"
            wants[r] += grant
    for r in by_pressure:  # a starved role takes a replica its neighbour can spare
        if asked[r] <= roles[r].replicas or wants[r] > roles[r].replicas:
            continue
        for d in reversed(by_pressure):
            inp, pd = roles[d], pressures[d]
            if (d == r or pd is None or wants[d] != inp.replicas or inp.running != inp.replicas
                    or wants[d] <= inp.min_replicas or pd >= (pressures[r] or 0.0)
                    or projected_down(pd, inp.replicas) >= cfg.upscale_threshold
                    or (states[d].last_change is not None
                        and now - states[d].last_change < cfg.cooldown_s)):
                continue
            wants[d] -= 1
            wants[r] += 1
            reasons[d] = f"gives a replica to {r} (budget {budget})"
            reasons[r] += f"; takes one from {d}"
            break


def _flat(m: PrefillMeasures | DecodeMeasures | None) -> dict[str, float | None]:
    if m is None:
        return {}
    out: dict[str, float | None] = dataclasses.asdict(m)
    if isinstance(m, PrefillMeasures):
        out["queue_wait_s"] = m.queue_wait_s
    return out

"""The control plane's sections of the app config: the SLOs, the SLO autoscaler's bounds
(cluster/slo_autoscaler.py) and how the ingress routes to the serving replicas
(cluster/prefix_router.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from serving.config_schema import Strict


class SLOSection(Strict):
    """Latency targets, met on the mean over the autoscaler's look-back window."""

    ttft_ms: float | None = Field(None, gt=0)  # time to first token
    tpot_ms: float | None = Field(None, gt=0)  # time per output token


class RoleBounds(Strict):
    # At least one of each role: a P/D request needs both.
    min_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> RoleBounds:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) < min_replicas "
                             f"({self.min_replicas})")
        return self


class AutoscalerSection(Strict):
    """The SLO autoscaler (cluster/slo_autoscaler.py, docs/autoscaling.md): prefill replicas
    to TTFT, decode replicas to TPOT and KV use, within these bounds."""

    enabled: bool = False
    prefill: RoleBounds = Field(default_factory=RoleBounds)
    decode: RoleBounds = Field(default_factory=RoleBounds)
    max_total_replicas: int | None = Field(None, ge=2)  # prefill + decode (e.g. GPUs); None: no cap
    # Pressure = measure / SLO. Up when above this for upscale_after_s; down one replica when
    # the pressure projected onto one replica fewer stays below downscale_threshold.
    upscale_threshold: float = Field(1.0, gt=0)
    downscale_threshold: float = Field(0.5, gt=0)
    upscale_after_s: float = Field(10.0, ge=0)
    downscale_after_s: float = Field(30.0, ge=0)
    cooldown_s: float = Field(30.0, ge=0)  # per role, after each change
    kv_high: float = Field(0.9, gt=0, le=1)  # decode KV use that counts as pressure 1.0
    look_back_period_s: float = Field(10.0, gt=0)  # Serve's window over the replicas' reports
    metrics_interval_s: float = Field(2.0, gt=0)  # how often replicas push their reports

    @model_validator(mode="after")
    def _consistent(self) -> AutoscalerSection:
        if self.downscale_threshold >= self.upscale_threshold:
            raise ValueError("downscale_threshold must be below upscale_threshold (hysteresis)")
        if self.look_back_period_s <= self.metrics_interval_s:
            raise ValueError("look_back_period_s must be longer than metrics_interval_s")
        floor = self.prefill.min_replicas + self.decode.min_replicas
        if self.max_total_replicas is not None and self.max_total_replicas < floor:
            raise ValueError(f"max_total_replicas ({self.max_total_replicas}) is below the "
                             f"roles' min_replicas together ({floor})")
        return self


class RoutingSection(Strict):
    """How the ingress picks the replica of the serving deployment (decode, or colocated) for
    a request (cluster/prefix_router.py, docs/routing.md)."""

    # prefix: the replica most likely holding the prompt's prefix pages; default: Serve's own
    # (power of two choices on queue length).
    policy: Literal["prefix", "default"] = "default"
    # A prefix match is followed while its replica has at most this many more requests in
    # flight than the least loaded one; past it, the least loaded one takes the request.
    max_imbalance: int = Field(4, ge=0)
    max_index_pages: int = Field(200_000, ge=1)  # page hashes the router remembers (LRU)

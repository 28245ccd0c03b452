"""`serve run configs/tiny.yaml` or `serve run cluster.app:build_app model=/path/to/hf`.

disaggregated:  Ingress -> DecodeServer (orchestrates) -> PrefillServer, KV via kvtransfer
colocated:      Ingress -> ColocatedServer (one engine, both phases)

With `autoscaler.enabled`, prefill and decode are scaled to the `slo:` by the application-level
policy that the Serve config names (configs/tiny-autoscale.yaml, docs/autoscaling.md).

HTTP ingress: Ray must be started with `RAY_SERVE_ENABLE_HA_PROXY=1` (`make serve` and the bench
launchers do) for HAProxy to take the HTTP traffic straight to the ingress replicas' own
servers, instead of Serve's Python proxy relaying every request and SSE event over a Ray call.
A Serve config cannot set it (it is read by Serve's controller, which starts before any
application), so build_app says so when it is off (docs/benchmarks.md, "HAProxy ingress").
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

from api.ingress import Ingress
from cluster.colocated import ColocatedServer
from cluster.prefix_router import router_config
from cluster.slo_autoscaler import autoscaling_config
from decode.deployment import DecodeServer
from engine.model_arch import ModelArch
from engine.request_limits import RequestLimits
from engine.tiny_model import ensure_tiny_model
from prefill.deployment import PrefillServer
from serving.config import AppConfig
from serving.metrics_hub import collect_snapshots

log = logging.getLogger(__name__)

HAPROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"


def build_app(args: dict[str, Any]):
    cfg = AppConfig.from_args(args)
    if os.environ.get(HAPROXY_ENV) != "1":
        log.warning("HTTP goes through Serve's Python proxy; start Ray (`serve run`, `ray start`)"
                    " with %s=1 for the HAProxy ingress (`make serve` does)", HAPROXY_ENV)
    if cfg.model.path is None:
        ensure_tiny_model()  # created once, here, before any replica starts
    arch = ModelArch.from_pretrained(cfg.model.resolved_path)
    max_model_len = RequestLimits.max_model_len_for(arch, cfg.engine_config(cfg.serving_role))
    limits = cfg.limits.resolved(max_model_len)  # refuses limits past the model, at build time
    plain = cfg.model_dump()
    if cfg.mode == "disaggregated":
        prefill = PrefillServer.options(**role_options(cfg, "prefill")).bind(plain)
        server = DecodeServer.options(**role_options(cfg, "decode")).bind(plain, prefill)
    else:
        server = ColocatedServer.options(**role_options(cfg, "colocated")).bind(plain)
    # An ingress replica being replaced (a redeploy) holds its clients' streams: it may not
    # hand them over, so it drains them, for as long as a request may last (Serve's default, 20
    # s, cut longer streams silently). Decode replicas keep Serve's bound: their streams resume
    # elsewhere. A `deployments:` entry in the Serve config still overrides this.
    ingress_opts = {**cfg.ingress.serve_options("ingress"),
                    "graceful_shutdown_timeout_s": cfg.request_timeout_s}
    return Ingress.options(**ingress_opts).bind(
        server, cfg.model.resolved_path, cfg.model.served_name, max_model_len,
        metrics_source=collect_snapshots, limits=dataclasses.asdict(limits),
        request_timeout_s=cfg.request_timeout_s, stream_interval_ms=cfg.stream_interval_ms,
        token_path=cfg.token_path, submit_batch=cfg.submit_batch, api_keys=cfg.api_keys,
        # Random weights sample ids the tokenizer may not know: stream ids, no text.
        detokenize=cfg.model.load_format != "dummy")


def role_options(cfg: AppConfig, role: str) -> dict[str, Any]:
    """A serving role's deployment options; with the SLO autoscaler on, Serve autoscales
    prefill and decode and the application's policy (cluster/slo_autoscaler.py) sets their
    replica counts. The role the ingress calls (decode, or colocated) gets the request router
    that `routing.policy` names (cluster/prefix_router.py)."""
    opts = getattr(cfg, role).serve_options(role)
    if cfg.autoscaler.enabled and role in ("prefill", "decode"):
        opts.update(num_replicas=None, autoscaling_config=autoscaling_config(cfg, role))
    if role in ("decode", "colocated") and cfg.routing.policy == "prefix":
        opts["request_router_config"] = router_config(cfg, role)
    return opts

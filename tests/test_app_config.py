"""The app config schema: shipped YAMLs parse, bad keys and values are refused by name at
`serve run` time (AppConfig.from_args), role overrides reach only their role. No Ray here."""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import pytest
import yaml

from engine.config import EngineConfig, ModelConfig
from kvtransfer.registry import TRANSPORTS
from serving.config import AppConfig

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
ENGINE_KEYS = ", ".join(sorted(f.name for f in dataclasses.fields(EngineConfig)))
ROLE_KEYS = "autoscaling_config, engine, max_ongoing_requests, num_replicas, ray_actor_options"
INGRESS_KEYS = ROLE_KEYS.replace("engine, ", "")
DECODE_KEYS = ROLE_KEYS.replace("engine, ", "engine, local_prefill_max_tokens, ").replace(
    "num_replicas, ", "num_replicas, prefill_batch, ")


def app_args(path: Path) -> dict:
    (app,) = yaml.safe_load(path.read_text())["applications"]
    return app["args"]


def refused(args: dict) -> str:
    with pytest.raises(ValueError) as info:
        AppConfig.from_args(args)
    return str(info.value)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_parse_and_survive_the_trip_to_replicas(path):
    cfg = AppConfig.from_args(app_args(path))
    # build_app ships model_dump() to every replica, which validates it again.
    again = AppConfig.from_args(cfg.model_dump())
    for role in ("prefill", "decode", "colocated"):
        assert again.engine_config(role) == cfg.engine_config(role)
    assert again == cfg


def test_shipped_tiny_config_maps_onto_engine_configs():
    cfg = AppConfig.from_args(app_args(CONFIGS[0].parent / "tiny.yaml"))
    shared = EngineConfig(page_size=16, num_pages=1024, max_num_seqs=64,
                          max_num_batched_tokens=512, attention_backend="torch")
    assert cfg.engine == shared
    assert cfg.engine_config("prefill") == dataclasses.replace(shared, max_num_batched_tokens=1024)
    assert cfg.engine_config("decode") == shared
    assert cfg.model.path is None and cfg.model.served_name == "tiny-llama"
    assert cfg.model.to_config() == ModelConfig(cfg.model.resolved_path)


def test_defaults_are_the_engine_defaults():
    cfg = AppConfig.from_args({})
    assert cfg.engine == EngineConfig()
    assert all(cfg.engine_config(r) == EngineConfig() for r in ("prefill", "decode", "colocated"))
    model_defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)
                      if f.name != "path"}
    assert {k: getattr(cfg.model, k) for k in model_defaults} == model_defaults


def test_model_path_shorthand():
    cfg = AppConfig.from_args({"model": "/models/my-llama"})
    assert cfg.model.to_config() == ModelConfig("/models/my-llama")
    assert cfg.model.served_name == "my-llama"


def test_a_role_override_changes_only_that_role():
    cfg = AppConfig.from_args({"engine": {"num_pages": 100, "max_num_seqs": 8},
                               "decode": {"engine": {"num_pages": 300}}})
    assert cfg.engine_config("decode") == EngineConfig(num_pages=300, max_num_seqs=8)
    assert cfg.engine_config("prefill") == EngineConfig(num_pages=100, max_num_seqs=8)
    assert cfg.engine_config("colocated") == EngineConfig(num_pages=100, max_num_seqs=8)


def test_an_override_to_null_is_kept_apart_from_no_override():
    cfg = AppConfig.from_args({"engine": {"num_pages": 100},
                               "prefill": {"engine": {"num_pages": None}}})
    assert cfg.engine_config("prefill").num_pages is None
    assert cfg.engine_config("decode").num_pages == 100
    again = AppConfig.from_args(cfg.model_dump())
    assert again.engine_config("prefill").num_pages is None
    assert again.model_dump()["decode"]["engine"] == {}


def test_a_bare_on_or_off_in_yaml_is_the_mode_of_that_name():
    # YAML 1.1, as Serve reads a config, turns a bare on / off into true / false.
    args = yaml.safe_load("engine: {cascade: off, overlap_scheduling: on}\n"
                          "prefill: {engine: {overlap_scheduling: off}}")
    assert args["engine"] == {"cascade": False, "overlap_scheduling": True}
    cfg = AppConfig.from_args(args)
    assert (cfg.engine.cascade, cfg.engine.overlap_scheduling) == ("off", "on")
    assert cfg.engine_config("prefill").overlap_scheduling == "off"
    assert cfg.engine_config("decode") == EngineConfig(cascade="off", overlap_scheduling="on")
    assert AppConfig.from_args(cfg.model_dump()) == cfg


@pytest.mark.parametrize("args, key, valid", [
    ({"max_num_seq": 1}, "max_num_seq",
     "api_keys, autoscaler, colocated, decode, engine, ingress, kv_transport, limits, mode, "
     "model, prefill, request_timeout_s, routing, slo, stream_interval_ms, submit_batch, "
     "token_path"),
    ({"routing": {"decode": "prefix"}}, "routing.decode",
     "max_imbalance, max_index_pages, policy"),
    ({"slo": {"ttft": 1}}, "slo.ttft", "tpot_ms, ttft_ms"),
    ({"autoscaler": {"budget": 4}}, "autoscaler.budget",
     "cooldown_s, decode, downscale_after_s, downscale_threshold, enabled, kv_high, "
     "look_back_period_s, max_total_replicas, metrics_interval_s, prefill, upscale_after_s, "
     "upscale_threshold"),
    ({"autoscaler": {"decode": {"max": 4}}}, "autoscaler.decode.max",
     "max_replicas, min_replicas"),
    ({"model": {"path": None, "dtyp": "float32"}}, "model.dtyp",
     "device, dtype, load_format, name, path, quantize, seed"),
    ({"engine": {"max_num_seq": 8}}, "engine.max_num_seq", ENGINE_KEYS),
    ({"prefill": {"engine": {"max_num_seq": 8}}}, "prefill.engine.max_num_seq", ENGINE_KEYS),
    ({"colocated": {"engine": {"pagesize": 8}}}, "colocated.engine.pagesize", ENGINE_KEYS),
    ({"decode": {"replicas": 2}}, "decode.replicas", DECODE_KEYS),
    ({"ingress": {"engine": {"num_pages": 1}}}, "ingress.engine", INGRESS_KEYS),
    ({"limits": {"max_tokens": 5}}, "limits.max_tokens",
     "max_batch_prefill_tokens, max_body_bytes, max_client_batch_size, max_concurrent_requests, "
     "max_input_tokens, max_stop_sequences, max_total_tokens, queue_timeout_s, retry_after_s"),
])
def test_an_unknown_key_is_named_with_the_valid_keys(args, key, valid):
    assert f"{key}: unknown key; valid keys: {valid}" in refused(args)


@pytest.mark.parametrize("args, message", [
    ({"engine": {"page_size": 3}}, "engine.page_size: must be a power of two, got 3"),
    ({"prefill": {"engine": {"page_size": 3}}}, "prefill.engine.page_size: must be a power of two"),
    ({"decode": {"engine": {"page_size": None}}}, "decode.engine.page_size: Input should be a"),
    ({"engine": {"max_num_seqs": "many"}}, "engine.max_num_seqs: Input should be a valid integer"),
    ({"engine": {"attention_backend": "xformers"}},
     "engine.attention_backend: must be one of flashinfer, torch; got 'xformers'"),
    ({"engine": {"cascade": "maybe"}}, "engine.cascade: must be one of auto, off, on"),
    ({"model": {"dtype": "int8"}}, "model.dtype: must be one of bfloat16, float16, float32"),
    ({"model": {"load_format": "gguf"}}, "model.load_format: must be one of dummy, safetensors"),
    ({"model": {"quantize": "int4"}}, "model.quantize: must be one of fp8; got 'int4'"),
    ({"engine": {"kv_cache_dtype": "fp8"}},
     "engine.kv_cache_dtype: must be one of auto, fp8_e4m3; got 'fp8'"),
    ({"decode": {"engine": {"kv_cache_dtype": "int8"}}},
     "decode.engine.kv_cache_dtype: must be one of auto, fp8_e4m3"),
    ({"limits": {"max_concurrent_requests": 0}}, "limits.max_concurrent_requests: must be > 0"),
    ({"limits": {"max_input_tokens": 10, "max_total_tokens": 5}},
     "limits.max_input_tokens: must be < max_total_tokens (5), got 10"),
    ({"request_timeout_s": 0}, "request_timeout_s: Input should be greater than 0"),
    ({"routing": {"policy": "sticky"}}, "routing.policy: Input should be 'prefix' or 'default'"),
    ({"routing": {"max_imbalance": -1}}, "routing.max_imbalance: Input should be greater than or"),
])
def test_an_invalid_value_is_refused_naming_the_field(args, message):
    assert message in refused(args)


@pytest.mark.parametrize("args, message", [
    ({"submit_batch": 0}, "submit_batch: Input should be greater than or equal to 1"),
    ({"submit_batch": 32, "token_path": "mailbox"}, "submit_batch: needs token_path: socket"),
    ({"submit_batch": 32, "routing": {"policy": "prefix"}},
     "submit_batch: needs routing.policy: default"),
    ({"submit_batch": 32, "mode": "colocated", "colocated": {"autoscaling_config": {}}},
     "submit_batch: needs colocated.autoscaling_config: null"),
])
def test_batched_submission_is_refused_where_it_would_change_routing_or_aborts(args, message):
    assert message in refused(args)


def test_batched_submission_is_on_by_default_and_steps_aside_where_it_cannot_work():
    assert AppConfig.from_args({}).submit_batch == 32
    for args in ({"token_path": "mailbox"}, {"routing": {"policy": "prefix"}},
                 {"mode": "colocated", "colocated": {"autoscaling_config": {}}}):
        cfg = AppConfig.from_args(args)
        assert cfg.submit_batch == 1 and AppConfig.from_args(cfg.model_dump()) == cfg
    cfg = AppConfig.from_args({"submit_batch": 8, "slo": SLO,
                               "autoscaler": {"enabled": True}})  # the SLO autoscaler is fine
    assert AppConfig.from_args(cfg.model_dump()).submit_batch == 8


def test_batched_prefill_calls_are_on_by_default_and_step_aside_for_serve_autoscaling():
    assert AppConfig.from_args({}).decode.prefill_batch == 32
    autoscaled = {"prefill": {"autoscaling_config": {"min_replicas": 1}}}
    cfg = AppConfig.from_args(autoscaled)
    assert cfg.decode.prefill_batch == 1 and AppConfig.from_args(cfg.model_dump()) == cfg
    assert "decode.prefill_batch: needs prefill.autoscaling_config: null" in refused(
        {**autoscaled, "decode": {"prefill_batch": 8}})
    assert "decode.prefill_batch: Input should be greater than or equal to 1" in refused(
        {"decode": {"prefill_batch": 0}})
    cfg = AppConfig.from_args({"decode": {"prefill_batch": 8}, "slo": SLO,
                               "autoscaler": {"enabled": True}})  # the SLO autoscaler is fine
    assert AppConfig.from_args(cfg.model_dump()).decode.prefill_batch == 8


def test_an_unknown_kv_transport_lists_the_registered_ones():
    message = refused({"kv_transport": "rdma"})
    assert f"kv_transport: unknown KV transport 'rdma'; valid: {', '.join(sorted(TRANSPORTS))}" \
        in message
    for name in TRANSPORTS:
        assert AppConfig.from_args({"kv_transport": name}).kv_transport == name


def test_every_error_is_reported_at_once():
    message = refused({"engine": {"max_num_seq": 8}, "kv_transport": "rdma", "modle": "x"})
    assert re.search(r"engine\.max_num_seq: .*kv_transport: .*modle: ", message)


SLO = {"ttft_ms": 500, "tpot_ms": 50}


@pytest.mark.parametrize("args, message", [
    ({"autoscaler": {"enabled": True}}, "autoscaler.enabled: needs slo.ttft_ms and slo.tpot_ms"),
    ({"autoscaler": {"enabled": True}, "slo": {"ttft_ms": 500}},
     "autoscaler.enabled: needs slo.tpot_ms"),
    ({"mode": "colocated", "slo": SLO, "autoscaler": {"enabled": True}},
     "autoscaler.enabled: needs mode: disaggregated"),
    ({"slo": {"ttft_ms": 0}}, "slo.ttft_ms: Input should be greater than 0"),
    ({"autoscaler": {"prefill": {"min_replicas": 3, "max_replicas": 2}}},
     "autoscaler.prefill: max_replicas (2) < min_replicas (3)"),
    ({"autoscaler": {"decode": {"min_replicas": 0}}},
     "autoscaler.decode.min_replicas: Input should be greater than or equal to 1"),
    ({"autoscaler": {"max_total_replicas": 3, "decode": {"min_replicas": 2},
                     "prefill": {"min_replicas": 2, "max_replicas": 2}}},
     "autoscaler: max_total_replicas (3) is below the roles' min_replicas together (4)"),
    ({"autoscaler": {"upscale_threshold": 0.5}},
     "autoscaler: downscale_threshold must be below upscale_threshold (hysteresis)"),
    ({"autoscaler": {"look_back_period_s": 2}},
     "autoscaler: look_back_period_s must be longer than metrics_interval_s"),
    ({"slo": SLO, "autoscaler": {"enabled": True}, "decode": {"autoscaling_config": {}}},
     "decode.autoscaling_config: must be null: the SLO autoscaler scales decode"),
    ({"slo": SLO, "autoscaler": {"enabled": True, "prefill": {"min_replicas": 2}}},
     "prefill.num_replicas: (the initial count) must be a number in autoscaler.prefill's "
     "[2, 4], not 1"),
    ({"slo": SLO, "autoscaler": {"enabled": True}, "decode": {"num_replicas": "auto"}},
     "decode.num_replicas: (the initial count) must be a number"),
])
def test_a_bad_autoscaler_config_is_refused_naming_the_field(args, message):
    assert message in refused(args)


def test_autoscaler_sections_survive_the_trip_and_stay_off_by_default():
    assert not AppConfig.from_args({}).autoscaler.enabled
    # An SLO alone (say, for the benchmarks) turns nothing on.
    assert not AppConfig.from_args({"slo": SLO}).autoscaler.enabled
    cfg = AppConfig.from_args({
        "slo": SLO, "decode": {"num_replicas": 2},
        "autoscaler": {"enabled": True, "max_total_replicas": 5, "cooldown_s": 5,
                       "decode": {"min_replicas": 1, "max_replicas": 3}}})
    assert AppConfig.from_args(cfg.model_dump()) == cfg
    assert (cfg.autoscaler.decode.max_replicas, cfg.autoscaler.prefill.max_replicas) == (3, 4)


def test_the_autoscaler_becomes_serve_autoscaling_configs_for_prefill_and_decode():
    pytest.importorskip("ray")
    from ray.serve.config import AutoscalingConfig

    from cluster.slo_autoscaler import autoscaling_config, policy_config
    from cluster.slo_policy import PolicyConfig

    cfg = AppConfig.from_args({
        "slo": SLO, "decode": {"num_replicas": 2},
        "autoscaler": {"enabled": True, "max_total_replicas": 5,
                       "decode": {"min_replicas": 1, "max_replicas": 3}}})
    assert policy_config(cfg) == PolicyConfig(  # the config's defaults, in seconds
        ttft_s=0.5, tpot_s=0.05, upscale_threshold=1.0, downscale_threshold=0.5,
        upscale_after_s=10.0, downscale_after_s=30.0, cooldown_s=30.0, kv_high=0.9,
        max_total_replicas=5)
    serve_cfg = AutoscalingConfig(**autoscaling_config(cfg, "decode"))  # Serve's own checks
    assert (serve_cfg.min_replicas, serve_cfg.initial_replicas, serve_cfg.max_replicas) == (1, 2, 3)
    assert serve_cfg.upscale_delay_s == serve_cfg.downscale_delay_s == 0
    assert serve_cfg.policy.policy_function == "cluster.slo_autoscaler:hold_without_app_policy"
    assert serve_cfg.policy.policy_kwargs["role"] == "decode"
    assert PolicyConfig(**serve_cfg.policy.policy_kwargs["policy"]) == policy_config(cfg)


def test_shipped_autoscale_config_names_the_application_policy():
    path = CONFIGS[0].parent / "tiny-autoscale.yaml"
    serve_config = yaml.safe_load(path.read_text())
    pytest.importorskip("ray")
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(serve_config)  # what `serve run`/`serve deploy` check
    (app,) = serve_config["applications"]
    assert app["autoscaling_policy"] == {"policy_function": "cluster.slo_autoscaler:slo_policy"}
    assert AppConfig.from_args(app["args"]).autoscaler.enabled


def test_routing_defaults_to_serves_router_and_takes_the_prefix_router_by_name():
    assert AppConfig.from_args({}).routing.policy == "default"
    cfg = AppConfig.from_args({"routing": {"policy": "prefix", "max_imbalance": 0}})
    assert (cfg.routing.policy, cfg.routing.max_imbalance) == ("prefix", 0)
    assert AppConfig.from_args(cfg.model_dump()) == cfg  # survives the trip to replicas


@pytest.mark.parametrize("value, warns", [(None, True), ("0", True), ("1", False)])
def test_build_app_warns_when_ray_runs_without_the_haproxy_ingress(tiny_llama, monkeypatch,
                                                                   caplog, value, warns):
    from cluster.app import HAPROXY_ENV, build_app

    if value is None:
        monkeypatch.delenv(HAPROXY_ENV, raising=False)
    else:
        monkeypatch.setenv(HAPROXY_ENV, value)
    with caplog.at_level(logging.WARNING, logger="cluster.app"):
        build_app({"model": {"path": tiny_llama}})
    assert any(HAPROXY_ENV in r.getMessage() for r in caplog.records) == warns

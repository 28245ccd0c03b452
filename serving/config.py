"""The Serve app's config schema (pydantic at the edge) and its mapping onto engine configs.

`serve run configs/tiny.yaml` passes the YAML's `args:` here; `serve run cluster.app:build_app
model=/path/to/hf` passes `{"model": "/path/to/hf"}`. Engine and model knobs are declared once,
in engine/config.py: `engine:` is validated as EngineConfig itself, and the `model:` section and
the per-role `engine:` overrides are derived from the dataclasses' fields.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    Field,
    SecretStr,
    ValidationError,
    create_model,
    field_validator,
    model_serializer,
    model_validator,
)

from engine.config import ConfigFieldError, EngineConfig, ModelConfig, default_model_dir
from kvtransfer.registry import TRANSPORTS
from serving.config_schema import Strict, explain
from serving.control_config import AutoscalerSection, RoleBounds, RoutingSection, SLOSection
from serving.limits import Limits

Role = Literal["prefill", "decode", "colocated"]
ROLES: tuple[Role, ...] = typing.get_args(Role)


def _field_specs(dc: type, skip: tuple[str, ...] = ()) -> dict[str, tuple[Any, Any]]:
    """`create_model` specs, (type, default), of a dataclass's fields."""
    hints = typing.get_type_hints(dc)
    specs = {}
    for f in dataclasses.fields(dc):
        if f.name in skip:
            continue
        if f.default_factory is not dataclasses.MISSING:
            specs[f.name] = (hints[f.name], Field(default_factory=f.default_factory))
        else:
            specs[f.name] = (hints[f.name], ... if f.default is dataclasses.MISSING else f.default)
    return specs


class _ModelSectionBase(Strict):
    """The serving-only keys of `model:`; ModelConfig's other fields are added to ModelSection."""

    path: str | None = None  # None: the tiny model at $PDSERVE_HOME/models/tiny-llama
    name: str | None = None  # served model name (default: the directory's name)

    @property
    def resolved_path(self) -> str:
        if self.path is None:
            return str(default_model_dir())
        return os.path.expandvars(os.path.expanduser(self.path))

    @property
    def served_name(self) -> str:
        return self.name or Path(self.resolved_path).name

    def to_config(self) -> ModelConfig:
        knobs = {f.name: getattr(self, f.name) for f in dataclasses.fields(ModelConfig)
                 if f.name != "path"}
        return ModelConfig(path=self.resolved_path, **knobs)

    @model_validator(mode="after")
    def _check(self) -> _ModelSectionBase:
        self.to_config()  # ModelConfig's own checks (dtype, device, ...) at validation time
        return self


ModelSection = create_model("ModelSection", __base__=_ModelSectionBase,
                            **_field_specs(ModelConfig, skip=("path",)))


class _Overrides(Strict):
    """A role's overrides of the `engine:` section. Only the keys the YAML sets count."""

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.model_fields_set}

    @model_serializer(mode="wrap")
    def _dump_set_keys(self, handler: Any) -> dict[str, Any]:
        # build_app ships the dump to every replica, which validates it again: an unset key
        # dumped as its None placeholder would come back as an override to None.
        return {k: v for k, v in handler(self).items() if k in self.model_fields_set}


# Every EngineConfig field, with its own type, defaulting to None = "not overridden". Pydantic
# does not validate defaults, so an explicit `page_size: null` is still refused.
EngineOverrides = create_model("EngineOverrides", __base__=_Overrides, **{
    name: (hint, None) for name, (hint, _) in _field_specs(EngineConfig).items()})


class DeploymentSection(Strict):
    num_replicas: int | Literal["auto"] | None = 1
    autoscaling_config: dict | None = None  # Serve's own schema; Serve checks it
    max_ongoing_requests: int = 256
    ray_actor_options: dict = Field(default_factory=dict)  # likewise Ray's

    def serve_options(self, name: str) -> dict:
        opts: dict[str, Any] = {"name": name, "max_ongoing_requests": self.max_ongoing_requests,
                                "ray_actor_options": self.ray_actor_options}
        if self.autoscaling_config is not None:
            opts["autoscaling_config"] = self.autoscaling_config
            opts["num_replicas"] = "auto" if self.num_replicas == "auto" else None
        else:
            opts["num_replicas"] = self.num_replicas
        return opts


class EngineDeploymentSection(DeploymentSection):
    """A deployment that runs an engine (not the ingress): it may override engine knobs."""

    engine: EngineOverrides = Field(default_factory=EngineOverrides)


class DecodeDeploymentSection(EngineDeploymentSection):
    """The decode deployment: an engine deployment that may also prefill short prompts."""

    # A decode replica prefills a prompt itself when at most this many of its tokens are not in
    # its prefix cache (a short prompt, or a new turn whose history it holds): longer steps for
    # its running batch instead of a prefill replica's round trip and a KV transfer (the
    # "conditional disaggregation" of NVIDIA Dynamo and TensorRT-LLM, which also count the
    # tokens after the prefix hit). 0 (default): every prompt goes to a prefill replica.
    local_prefill_max_tokens: int = Field(0, ge=0)
    # Up to this many prompts a decode replica sends the prefill deployment in one Serve call
    # (`prefill_many`, serving/batched_submit.py), as the ingress does with `submit_batch`: a
    # wave of prompts then costs both replicas' processes a few calls' Python work instead of
    # one per prompt. Their aborts travel over a token socket of the decode replica's. 1: a call
    # per prompt. Needs `prefill.autoscaling_config: null` (Serve's policy would count a call of
    # many prompts as one); where it is set, the default is 1. Transports that stream layers
    # (`nccl`, `gloo`) make a streaming call per prompt, and `ray` a call per prompt: its KV
    # handles are object refs, which Ray may lose inside a streaming call's items
    # (kvtransfer/transport.py).
    prefill_batch: int = Field(32, ge=1)


class AppConfig(Strict):
    mode: Literal["disaggregated", "colocated"] = "disaggregated"
    model: ModelSection = Field(default_factory=ModelSection)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    kv_transport: str = "ray"  # a name in kvtransfer.registry.TRANSPORTS
    prefill: EngineDeploymentSection = Field(default_factory=EngineDeploymentSection)
    decode: DecodeDeploymentSection = Field(default_factory=DecodeDeploymentSection)
    colocated: EngineDeploymentSection = Field(default_factory=EngineDeploymentSection)
    ingress: DeploymentSection = Field(default_factory=DeploymentSection)
    request_timeout_s: float = Field(600.0, gt=0)
    limits: Limits = Field(default_factory=Limits)  # admission limits of the HTTP API
    # Bearer keys of the HTTP API (every route but /health); None: $PDSERVE_API_KEYS on the
    # ingress replicas, or open. SecretStr: a printed config or an error never shows them.
    api_keys: list[SecretStr] | None = None
    # While an ingress replica streams to more than 8 clients, hand each one its tokens at most
    # this often (merged): fewer, larger SSE events. 0 (the default) = every token its own event.
    stream_interval_ms: float = Field(0.0, ge=0)
    # How tokens travel from the serving replicas to the ingress: "socket" sends one frame per
    # engine step for all of an ingress replica's streams over a TCP connection from each
    # serving replica to each ingress replica (serving/token_socket.py); "mailbox" the same
    # batches as Ray calls through a mailbox actor per ingress replica
    # (serving/token_mailbox.py: one more process and two Ray calls per step);
    # "stream" one Serve streaming message per output per request (one hop fewer: lower
    # latency for a few streams, but its cost grows with the number of streams).
    token_path: Literal["socket", "mailbox", "stream"] = "socket"
    # Up to this many requests an ingress replica sends the serving deployment in one Serve call
    # (serving/batched_submit.py): a wave of requests then costs the serving replica, whose engine
    # steps wait on its GIL, a few calls' work instead of one per request. 1: a call per
    # request. Needs `token_path: socket` (it carries the aborts), Serve's own routing (the
    # prefix router reads one prompt per call) and no Serve `autoscaling_config` (it counts
    # calls, not requests; the SLO autoscaler is fine); where those are not so, the default
    # is 1. On the H200 (docs/benchmarks.md, run 92): colocated fp8 +9%, bf16 +1%.
    submit_batch: int = Field(32, ge=1)
    slo: SLOSection = Field(default_factory=SLOSection)
    autoscaler: AutoscalerSection = Field(default_factory=AutoscalerSection)
    routing: RoutingSection = Field(default_factory=RoutingSection)

    @field_validator("model", mode="before")
    @classmethod
    def _path_shorthand(cls, v: Any) -> Any:
        return {"path": v} if isinstance(v, str) else v

    @field_validator("kv_transport")
    @classmethod
    def _known_transport(cls, v: str) -> str:
        if v not in TRANSPORTS:
            raise ValueError(f"unknown KV transport {v!r}; valid: {', '.join(sorted(TRANSPORTS))}")
        return v

    @model_validator(mode="after")
    def _roles_valid(self) -> AppConfig:
        # An override can break a check across fields of the merged config; say which role.
        for role in ROLES:
            try:
                self.engine_config(role)
            except ConfigFieldError as e:
                raise ConfigFieldError(f"{role}.engine.{e.field}", e.problem) from None
        return self

    @model_validator(mode="after")
    def _batching_usable(self) -> AppConfig:
        """`submit_batch` and `decode.prefill_batch` set where they cannot work are refused;
        their defaults step aside (to 1) there."""
        _step_aside(self, "submit_batch", "submit_batch", self._submit_batch_problem())
        _step_aside(self.decode, "prefill_batch", "decode.prefill_batch",
                    None if self.prefill.autoscaling_config is None else
                    "needs prefill.autoscaling_config: null (Serve's policy counts a call of "
                    "many prompts as one; the SLO autoscaler reads the replicas' own counts)")
        return self

    def _submit_batch_problem(self) -> str | None:
        role = self.serving_role
        if self.token_path != "socket":
            return "needs token_path: socket (it carries the aborts of batched requests)"
        if self.routing.policy != "default":
            return "needs routing.policy: default (the prefix router picks a replica by one " \
                   "request's prompt)"
        if getattr(self, role).autoscaling_config is not None:
            return (f"needs {role}.autoscaling_config: null (Serve's policy counts a call of "
                    "many requests as one; the SLO autoscaler reads the replicas' own counts)")
        return None

    @model_validator(mode="after")
    def _autoscaler_usable(self) -> AppConfig:
        if not self.autoscaler.enabled:
            return self
        if self.mode != "disaggregated":
            raise ConfigFieldError("autoscaler.enabled", "needs mode: disaggregated")
        missing = [f"slo.{k}" for k in ("ttft_ms", "tpot_ms") if getattr(self.slo, k) is None]
        if missing:
            raise ConfigFieldError("autoscaler.enabled", f"needs {' and '.join(missing)}")
        for role in ("prefill", "decode"):
            section: DeploymentSection = getattr(self, role)
            bounds: RoleBounds = getattr(self.autoscaler, role)
            if section.autoscaling_config is not None:
                raise ConfigFieldError(f"{role}.autoscaling_config", "must be null: the SLO "
                                       f"autoscaler scales {role} (set autoscaler.{role})")
            n = section.num_replicas
            if not isinstance(n, int) or not bounds.min_replicas <= n <= bounds.max_replicas:
                raise ConfigFieldError(f"{role}.num_replicas", f"(the initial count) must be "
                                       f"a number in autoscaler.{role}'s [{bounds.min_replicas},"
                                       f" {bounds.max_replicas}], not {n!r}")
        return self

    @property
    def serving_role(self) -> Role:
        """The role the ingress calls: decode, or colocated."""
        return "decode" if self.mode == "disaggregated" else "colocated"

    def engine_config(self, role: Role) -> EngineConfig:
        """The engine config of a role: the shared section plus that role's overrides."""
        section: EngineDeploymentSection = getattr(self, role)
        return dataclasses.replace(self.engine, **section.engine.as_dict())

    @staticmethod
    def from_args(args: dict[str, Any]) -> AppConfig:
        """The validated config; a ValueError naming each bad key (and the valid ones) if not."""
        try:
            return AppConfig.model_validate(dict(args))
        except ValidationError as e:
            raise ValueError(explain(e, AppConfig)) from None


def _step_aside(section: BaseModel, key: str, name: str, problem: str | None) -> None:
    """A batching setting (`key` of `section`, `name` in the app config) above 1 where
    `problem` says it cannot work: refused if the user set it, else set to 1."""
    if problem is None or getattr(section, key) == 1:
        return
    if key in section.model_fields_set:
        raise ConfigFieldError(name, problem)
    setattr(section, key, 1)

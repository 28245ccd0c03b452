"""The Serve app's config schema (pydantic at the edge) and its mapping onto engine configs.

`serve run configs/tiny.yaml` passes the YAML's `args:` here; `serve run cluster.app:build_app
model=/path/to/hf` passes `{"model": "/path/to/hf"}`.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from engine.config import EngineConfig, ModelConfig, default_model_dir
from serving.limits import Limits


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(_Strict):
    path: str | None = None  # None: the tiny model at $PDSERVE_HOME/models/tiny-llama
    name: str | None = None  # served model name (default: the directory's name)
    dtype: str = "float32"
    device: str = "cpu"
    load_format: Literal["safetensors", "dummy"] = "safetensors"
    seed: int = 0

    @property
    def resolved_path(self) -> str:
        if self.path is None:
            return str(default_model_dir())
        return os.path.expandvars(os.path.expanduser(self.path))

    @property
    def served_name(self) -> str:
        from pathlib import Path

        return self.name or Path(self.resolved_path).name

    def to_config(self) -> ModelConfig:
        return ModelConfig(self.resolved_path, self.dtype, self.device, self.load_format,
                           self.seed)


class EngineSection(_Strict):
    page_size: int = 16
    num_pages: int | None = None
    kv_memory_fraction: float = 0.8
    kv_memory_gb: float = 0.25
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    attention_backend: Literal["torch", "flashinfer"] = "torch"
    cascade: Literal["auto", "on", "off"] = "auto"
    cuda_graphs: bool = False

    def to_config(self, **overrides: Any) -> EngineConfig:
        return EngineConfig(**{**self.model_dump(), **overrides})


class DeploymentSection(_Strict):
    num_replicas: int | Literal["auto"] | None = 1
    autoscaling_config: dict | None = None
    max_ongoing_requests: int = 256
    ray_actor_options: dict = Field(default_factory=dict)
    engine: dict = Field(default_factory=dict)  # per-role overrides of the engine section

    def serve_options(self, name: str) -> dict:
        opts: dict[str, Any] = {"name": name, "max_ongoing_requests": self.max_ongoing_requests,
                                "ray_actor_options": self.ray_actor_options}
        if self.autoscaling_config is not None:
            opts["autoscaling_config"] = self.autoscaling_config
            opts["num_replicas"] = "auto" if self.num_replicas == "auto" else None
        else:
            opts["num_replicas"] = self.num_replicas
        return opts


class AppConfig(_Strict):
    mode: Literal["disaggregated", "colocated"] = "disaggregated"
    model: ModelSection = Field(default_factory=ModelSection)
    engine: EngineSection = Field(default_factory=EngineSection)
    kv_transport: Literal["ray", "cuda_ipc", "inline"] = "ray"
    prefill: DeploymentSection = Field(default_factory=DeploymentSection)
    decode: DeploymentSection = Field(default_factory=DeploymentSection)
    colocated: DeploymentSection = Field(default_factory=DeploymentSection)
    ingress: DeploymentSection = Field(default_factory=DeploymentSection)
    request_timeout_s: float = Field(600.0, gt=0)
    limits: Limits = Field(default_factory=Limits)  # admission limits of the HTTP API
    # While a replica streams to many clients, hand each one its tokens at most this often
    # (merged): fewer, larger messages through Serve. 0 = every token as it comes.
    stream_interval_ms: float = 0.0

    @field_validator("model", mode="before")
    @classmethod
    def _path_shorthand(cls, v: Any) -> Any:
        return {"path": v} if isinstance(v, str) else v

    def engine_config(self, role: str) -> EngineConfig:
        """The engine config of a role: the shared section plus that role's overrides."""
        section = {"prefill": self.prefill, "decode": self.decode,
                   "colocated": self.colocated}[role]
        return self.engine.to_config(**section.engine)

    @staticmethod
    def from_args(args: dict[str, Any]) -> AppConfig:
        cfg = AppConfig.model_validate(dict(args))
        for role in ("prefill", "decode", "colocated"):
            cfg.engine_config(role)  # validate every role's engine config at build time
        cfg.model.to_config()
        return cfg

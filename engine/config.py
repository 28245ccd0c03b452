"""Frozen configs for the engine. Every knob is declared once, here, with its comment: the Serve
app config (serving/config.py) validates `engine:` as EngineConfig itself and derives `model:`
and the per-role overrides from these fields."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from engine.attention.registry import ATTENTION_BACKENDS

DTYPES = ("float32", "bfloat16", "float16")
LOAD_FORMATS = ("safetensors", "dummy")
CASCADE_MODES = ("auto", "on", "off")
QUANTIZE_MODES = ("fp8",)  # docs/fp8.md: weights float8_e4m3fn per channel, activations per token
# auto: the model's dtype; fp8_e4m3: float8_e4m3fn pages with scale 1.0 (docs/fp8.md)
KV_CACHE_DTYPES = ("auto", "fp8_e4m3")
OVERLAP_MODES = ("auto", "on", "off")


def pdserve_home() -> Path:
    return Path(os.environ.get("PDSERVE_HOME", Path.home() / ".cache" / "pdserve"))


def default_model_dir() -> Path:
    return pdserve_home() / "models" / "tiny-llama"


class ConfigFieldError(ValueError):
    """A bad value of one config field. `field` is kept apart so the app config can report the
    full path of the key (`prefill.engine.page_size`) rather than only the section."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(field, problem)  # both in args: the error pickles (Ray ships errors)
        self.field = field
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.field} {self.problem}"


def _one_of(field: str, value: str, valid: Iterable[str]) -> None:
    names = sorted(valid)
    if value not in names:
        raise ConfigFieldError(field, f"must be one of {', '.join(names)}; got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    path: str  # a local Hugging Face model directory
    dtype: str = "float32"  # float32, bfloat16 or float16
    device: str = "cpu"  # cpu, cuda or cuda:N
    load_format: str = "safetensors"  # or dummy: random weights for a real config.json
    seed: int = 0  # for load_format=dummy
    # None: as the checkpoint is (an fp8 checkpoint's config.json `quantization_config` turns
    # fp8 on by itself); fp8: quantize bf16/fp16 weights at load. engine/fp8_checkpoint.py.
    quantize: str | None = None

    def __post_init__(self) -> None:
        _one_of("dtype", self.dtype, DTYPES)
        _one_of("load_format", self.load_format, LOAD_FORMATS)
        if self.quantize is not None:
            _one_of("quantize", self.quantize, QUANTIZE_MODES)
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigFieldError("device", f"must be 'cpu' or 'cuda[:N]', got {self.device!r}")


@dataclass(frozen=True)
class EngineConfig:
    # pydantic reads this when the app config validates its `engine:` section as this class
    # (a plain dict is a valid ConfigDict, so the engine needs no pydantic import).
    __pydantic_config__ = {"extra": "forbid"}

    page_size: int = 16  # tokens per KV page (a power of two)
    num_pages: int | None = None  # None: sized from kv_memory_fraction (GPU) or kv_memory_gb
    kv_memory_fraction: float = 0.8  # of free GPU memory after weights (cuda only)
    kv_memory_gb: float = 0.25  # KV pool size on CPU when num_pages is None
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    max_num_seqs: int = 64  # running requests per replica
    max_num_batched_tokens: int = 2048  # per-step token budget (prefill chunks + decodes)
    enable_prefix_caching: bool = True  # share the pages of equal prompt prefixes
    attention_backend: str = "torch"  # a name in engine.attention.registry.ATTENTION_BACKENDS
    # auto: a measured rule picks cascade or plain decode per step. This and
    # overlap_scheduling take a bool too: YAML 1.1 (Serve's reader) reads a bare on / off as
    # true / false, so `cascade: off` arrives as False; either becomes "on" / "off" here.
    cascade: str | bool = "auto"
    cuda_graphs: bool = False  # capture decode steps as CUDA graphs (GPU only)
    kv_cache_dtype: str = "auto"  # a name in KV_CACHE_DTYPES: fp8_e4m3 halves the KV bytes
    # Plan step N+1 while step N runs on the device (its sampled ids feed N+1 there; outputs
    # come one step later). auto: on for CUDA, off on CPU, where kernels run synchronously and
    # the lag would only delay tokens. The tokens are the same either way.
    overlap_scheduling: str | bool = "auto"
    # A decode step waits up to this long for prompts reserved here (their KV on its way)
    # while they would at least double the running batch: on a GPU shared with a prefill
    # replica, the prefill then runs without the decode steps between its kernels
    # (engine/decode_hold.py). 0: never waits.
    decode_hold_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.page_size < 1 or self.page_size & (self.page_size - 1):
            raise ConfigFieldError("page_size", f"must be a power of two, got {self.page_size}")
        if self.num_pages is not None and self.num_pages < 1:
            raise ConfigFieldError("num_pages", f"must be >= 1, got {self.num_pages}")
        if not 0.0 < self.kv_memory_fraction <= 1.0:
            raise ConfigFieldError("kv_memory_fraction",
                                   f"must be in (0, 1], got {self.kv_memory_fraction}")
        if self.kv_memory_gb <= 0:
            raise ConfigFieldError("kv_memory_gb", f"must be > 0, got {self.kv_memory_gb}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigFieldError("max_model_len", f"must be >= 1, got {self.max_model_len}")
        if self.max_num_seqs < 1:
            raise ConfigFieldError("max_num_seqs", f"must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ConfigFieldError("max_num_batched_tokens",
                                   f"must be >= 1, got {self.max_num_batched_tokens}")
        if self.decode_hold_ms < 0:
            raise ConfigFieldError("decode_hold_ms", f"must be >= 0, got {self.decode_hold_ms}")
        for name in ("cascade", "overlap_scheduling"):
            if isinstance(value := getattr(self, name), bool):
                object.__setattr__(self, name, "on" if value else "off")  # frozen
        _one_of("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        _one_of("cascade", self.cascade, CASCADE_MODES)
        _one_of("overlap_scheduling", self.overlap_scheduling, OVERLAP_MODES)
        _one_of("kv_cache_dtype", self.kv_cache_dtype, KV_CACHE_DTYPES)

    def kv_dtype_name(self, model_dtype: str) -> str:
        """The torch dtype name of the KV pages for a model of `model_dtype`."""
        return model_dtype if self.kv_cache_dtype == "auto" else "float8_e4m3fn"

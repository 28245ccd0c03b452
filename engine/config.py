"""Frozen configs for the engine. The Serve YAML maps onto these (see serving/config.py)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from engine.attention.registry import ATTENTION_BACKENDS

DTYPES = ("float32", "bfloat16", "float16")
LOAD_FORMATS = ("safetensors", "dummy")
CASCADE_MODES = ("auto", "on", "off")


def pdserve_home() -> Path:
    return Path(os.environ.get("PDSERVE_HOME", Path.home() / ".cache" / "pdserve"))


def default_model_dir() -> Path:
    return pdserve_home() / "models" / "tiny-llama"


@dataclass(frozen=True)
class ModelConfig:
    path: str  # a local Hugging Face model directory
    dtype: str = "float32"
    device: str = "cpu"
    load_format: str = "safetensors"
    seed: int = 0  # for load_format=dummy

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {self.load_format!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")


@dataclass(frozen=True)
class EngineConfig:
    page_size: int = 16
    num_pages: int | None = None  # None: sized from kv_memory_fraction (GPU) or kv_memory_gb
    kv_memory_fraction: float = 0.8  # of free GPU memory after weights (cuda only)
    kv_memory_gb: float = 0.25  # KV pool size on CPU when num_pages is None
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048  # per-step token budget (prefill chunks + decodes)
    enable_prefix_caching: bool = True
    attention_backend: str = "torch"
    cascade: str = "auto"  # auto: a measured rule picks cascade or plain decode per step
    cuda_graphs: bool = False

    def __post_init__(self) -> None:
        if self.page_size < 1 or self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {self.page_size}")
        if self.num_pages is not None and self.num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {self.num_pages}")
        if not 0.0 < self.kv_memory_fraction <= 1.0:
            raise ValueError(f"kv_memory_fraction must be in (0, 1], got {self.kv_memory_fraction}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {sorted(ATTENTION_BACKENDS)}")
        if self.cascade not in CASCADE_MODES:
            raise ValueError(f"cascade must be one of {CASCADE_MODES}")

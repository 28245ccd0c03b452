"""Attention backends by name. An entry is imported only when chosen (FlashInfer is an optional,
GPU-only dependency), and this module imports no torch, so configs can validate names cheaply."""

from __future__ import annotations

from importlib import import_module

# name -> "module:class"
ATTENTION_BACKENDS: dict[str, str] = {
    "torch": "engine.attention.torch_backend:TorchBackend",
    "flashinfer": "engine.attention.flashinfer_backend:FlashInferBackend",
}


def make_backend(name: str, **kwargs):
    """An `AttentionBackend` (engine/attention/base.py) built with `kwargs`."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; valid: {sorted(ATTENTION_BACKENDS)}")
    module, cls = ATTENTION_BACKENDS[name].split(":")
    return getattr(import_module(module), cls)(**kwargs)

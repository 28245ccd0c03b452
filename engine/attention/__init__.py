"""Attention backends: plan once per step, run per layer. Chosen by name from EngineConfig."""

from __future__ import annotations

from engine.attention.base import AttentionBackend, AttentionMetadata, CascadeLevel


def make_backend(name: str, **kwargs) -> AttentionBackend:
    if name == "torch":
        from engine.attention.torch_backend import TorchBackend

        return TorchBackend(**kwargs)
    if name == "flashinfer":
        # Imported lazily: FlashInfer is an optional, GPU-only dependency.
        from engine.attention.flashinfer_backend import FlashInferBackend

        return FlashInferBackend(**kwargs)
    raise ValueError(f"unknown attention backend {name!r} (choose 'torch' or 'flashinfer')")


__all__ = ["AttentionBackend", "AttentionMetadata", "CascadeLevel", "make_backend"]

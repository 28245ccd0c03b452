from __future__ import annotations

import pytest

from engine.tiny_model import make_tiny_model

FAMILIES = ("llama", "mistral", "qwen2")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """One tiny model per family, made once per test session."""
    root = tmp_path_factory.mktemp("models")
    return {f: str(make_tiny_model(root / f"tiny-{f}", family=f, seed=0)) for f in FAMILIES}


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> str:
    return tiny_models["llama"]

from __future__ import annotations

import pytest

from engine.llm import LLM
from engine.tiny_model import ensure_tiny_model, make_tiny_model

FAMILIES = ("llama", "mistral", "qwen2")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """One tiny model per family, made once per test session."""
    root = tmp_path_factory.mktemp("models")
    return {f: str(make_tiny_model(root / f"tiny-{f}", family=f, seed=0)) for f in FAMILIES}


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> str:
    return tiny_models["llama"]


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> LLM:
    """A real engine on the tiny Llama, one per test module (the API tests drive it)."""
    return LLM(ensure_tiny_model(tmp_path_factory.getbasetemp() / "tiny-llama"), num_pages=256)

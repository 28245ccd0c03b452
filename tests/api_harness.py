"""What the in-process API tests share: an HTTP client over an app's ASGI interface, and an
engine for `build_api` that, when the test is done, stops and has every page back."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx

from engine.async_engine import AsyncEngine
from engine.llm import LLM


def client_for(app, base_url: str = "http://test", timeout: float = 5.0) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base_url,
                             timeout=timeout)


@asynccontextmanager
async def serving_engine(llm: LLM) -> AsyncIterator[AsyncEngine]:
    """`llm`'s engine behind an AsyncEngine; afterwards its loop stops and no page is in use."""
    engine = AsyncEngine(llm.engine)
    yield engine
    engine.close()
    assert llm.engine.num_pages_used == 0  # every page of every request came back

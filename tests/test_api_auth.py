"""Optional API keys: with keys set (config or $PDSERVE_API_KEYS) every route but /health needs
`Authorization: Bearer <key>`, else a 401 in the route family's shape, before admission; the
keys never reach the logs or /metrics; without keys the API is open."""

from __future__ import annotations

import logging

import pytest
from pydantic import SecretStr

from api.auth import ApiKeys, resolve_keys
from api.server import build_api
from engine.llm import LLM
from serving.config import AppConfig
from serving.limits import Limits
from tests.api_harness import client_for, serving_engine
from tests.test_api_errors import openai_error, tgi_error

pytestmark = pytest.mark.anyio
KEYS = ["sk-first-key", "sk-second-key"]
ROUTES = [("GET", "/v1/models", None), ("GET", "/v1/models/tiny", None),
          ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2}),
          ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                            "max_tokens": 2}),
          ("POST", "/generate", {"inputs": "hi", "parameters": {"max_new_tokens": 2}}),
          ("POST", "/generate_stream", {"inputs": "hi", "parameters": {"max_new_tokens": 2}}),
          ("POST", "/", {"inputs": "hi", "parameters": {"max_new_tokens": 2}}),
          ("GET", "/info", None), ("POST", "/tokenize", {"inputs": "hi"}),
          ("GET", "/metrics", None), ("GET", "/openapi.json", None)]


@pytest.fixture
async def engine(llm: LLM):
    async with serving_engine(llm) as engine:
        yield engine


async def test_every_route_but_health_needs_a_key(engine, llm: LLM, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    app = build_api(engine, llm.tokenizer, "tiny", 2048, api_keys=[SecretStr(k) for k in KEYS],
                    limits=Limits(max_concurrent_requests=1))
    async with client_for(app) as http:
        assert (await http.get("/health")).status_code == 200
        for auth in (None, "Bearer wrong", "Basic " + KEYS[0], "Bearer", KEYS[0],
                     "Bearer " + KEYS[0][:-1], "Bearer " + KEYS[0] + "x"):
            headers = {"authorization": auth} if auth else {}
            for method, path, body in ROUTES:
                r = await http.request(method, path, json=body, headers=headers)
                assert r.headers["www-authenticate"] == "Bearer"
                if path.startswith("/v1/"):
                    err = openai_error(r, 401)
                    assert err["code"] == "invalid_api_key"
                    assert err["type"] == "invalid_request_error"
                else:
                    tgi_error(r, 401, "unauthorized")
        for key in KEYS:
            for method, path, body in ROUTES:
                r = await http.request(method, path, json=body,
                                       headers={"Authorization": f"bearer  {key} "})
                assert r.status_code == 200, (path, r.text)
        metrics = (await http.get("/metrics", headers={"authorization": f"Bearer {KEYS[1]}"}))
    # 7 refused headers x 11 routes; none of them took an admission slot (limit 1).
    assert 'pdserve_api_unauthorized_requests_total{role="api"' in metrics.text
    assert "} 77\n" in metrics.text
    assert "pdserve_api_rejected_requests_total" in metrics.text and "} 0\n" in metrics.text
    for key in KEYS:
        assert key not in metrics.text and key not in caplog.text
        assert key[:-1] not in caplog.text


async def test_keys_from_the_environment(engine, llm: LLM, monkeypatch) -> None:
    monkeypatch.setenv("PDSERVE_API_KEYS", " sk-env-1 ,sk-env-2,, ")
    async with client_for(build_api(engine, llm.tokenizer, "tiny", 2048)) as http:
        assert (await http.get("/info")).status_code == 401
        for key in ("sk-env-1", "sk-env-2"):
            r = await http.get("/info", headers={"authorization": f"Bearer {key}"})
            assert r.status_code == 200
    # Keys given explicitly win over the environment; an explicit empty list is open.
    async with client_for(build_api(engine, llm.tokenizer, "tiny", 2048, api_keys=[])) as http:
        assert (await http.get("/info")).status_code == 200


async def test_open_without_keys(engine, llm: LLM, monkeypatch) -> None:
    monkeypatch.delenv("PDSERVE_API_KEYS", raising=False)
    async with client_for(build_api(engine, llm.tokenizer, "tiny", 2048)) as http:
        assert (await http.get("/info")).status_code == 200
        metrics = (await http.get("/metrics")).text
    assert "unauthorized" not in metrics


def test_keys_in_the_app_config() -> None:
    cfg = AppConfig.from_args({"api_keys": KEYS})
    assert KEYS[0] not in repr(cfg) and KEYS[0] not in str(cfg.model_dump(mode="json"))
    assert ApiKeys(cfg.api_keys).allows(KEYS[1]) and not ApiKeys(cfg.api_keys).allows("sk")
    assert AppConfig.from_args({}).api_keys is None
    assert KEYS[0] not in repr(ApiKeys(KEYS))
    with pytest.raises(ValueError, match="api_key: unknown key; valid keys: api_keys"):
        AppConfig.from_args({"api_key": KEYS})
    with pytest.raises(ValueError, match="api_keys") as e:
        AppConfig.from_args({"api_keys": KEYS[0]})  # a string, not a list
    assert KEYS[0] not in str(e.value)
    assert resolve_keys(["", " "]) == []


def test_build_app_hands_the_configured_keys_to_the_ingress(tiny_llama):
    from cluster.app import build_app

    app = build_app({"model": {"path": tiny_llama}, "api_keys": ["sk-one"]})
    keys = app._bound_deployment.init_kwargs["api_keys"]
    assert [k.get_secret_value() for k in keys] == ["sk-one"]
    assert "sk-one" not in repr(keys)  # never printed with the app's options
    assert build_app({"model": {"path": tiny_llama}})._bound_deployment.init_kwargs[
        "api_keys"] is None

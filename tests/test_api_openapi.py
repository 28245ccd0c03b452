"""The OpenAPI schema is the contract: every route declares the statuses and content types it
answers with (checked against the table in api/openapi.py and against what requests observe
here), the request schemas carry the enforced constraints (non-empty prompt, ranges, roles,
stop count), and FastAPI's 422 body, which never leaves the server, is not declared."""

from __future__ import annotations

import httpx
import pytest

from api.openapi import ROUTES
from api.server import build_api
from engine.async_engine import AsyncEngine
from engine.llm import LLM
from serving.limits import Limits
from tests.api_harness import serving_engine

pytestmark = pytest.mark.anyio
KEY = "sk-test"
AUTH = {"authorization": f"Bearer {KEY}"}
GOOD = {"/v1/completions": {"prompt": "hi", "max_tokens": 2},
        "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}],
                                 "max_tokens": 2},
        "/generate": {"inputs": "hi", "parameters": {"max_new_tokens": 2}},
        "/generate_stream": {"inputs": "hi", "parameters": {"max_new_tokens": 2}},
        "/": {"inputs": "hi", "parameters": {"max_new_tokens": 2}},
        "/tokenize": {"inputs": "hi"}}
STREAMS = {"/v1/completions": {"stream": True}, "/v1/chat/completions": {"stream": True},
           "/": {"stream": True}}
BAD = {"/v1/completions": [{"prompt": ""}, {"prompt": "hi", "seed": True},
                           {"prompt": "hi", "model": "gpt-9"}],
       "/v1/chat/completions": [{"messages": [{"role": "user"}]},
                                {"messages": [{"role": "user", "content": "x"}],
                                 "model": "gpt-9"}],
       "/generate": [{"inputs": ""}, {"inputs": "hi", "parameters": {"top_p": 1.0}}],
       "/generate_stream": [{"inputs": "hi", "parameters": {"details": 1}}],
       "/": [{"inputs": "hi", "stream": 0}], "/tokenize": [{"inputs": ""}]}


@pytest.fixture
async def app(llm: LLM):
    async with serving_engine(llm) as engine:
        yield build_api(engine, llm.tokenizer, "tiny", 2048, api_keys=[KEY],
                        limits=Limits(max_body_bytes=4000))


def declared(schema: dict, method: str, path: str) -> dict[str, set[str]]:
    op = schema["paths"][path][method]
    return {status: set(r.get("content", {})) for status, r in op["responses"].items()}


async def test_declared_matches_the_table(app) -> None:
    schema = app.openapi()
    routes = {(m, p) for p, ops in schema["paths"].items() for m in ops}
    assert routes == set(ROUTES)  # every route of the app has its row, and no row is stale
    assert "HTTPValidationError" not in str(schema)
    for (method, path), (errors, _) in ROUTES.items():
        statuses = set(declared(schema, method, path))
        auth = set() if path == "/health" else {"401"}
        assert statuses == {"200", *map(str, errors), *auth}, path
    assert declared(schema, "get", "/metrics")["200"] == {"text/plain"}
    assert declared(schema, "post", "/generate_stream")["200"] == {"text/event-stream"}
    for path in ("/v1/completions", "/v1/chat/completions", "/"):
        assert declared(schema, "post", path)["200"] == {"application/json",
                                                         "text/event-stream"}
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


async def test_request_schemas_carry_the_checks(app) -> None:
    comps = app.openapi()["components"]["schemas"]
    prompt = comps["CompletionRequest"]["properties"]["prompt"]["anyOf"]
    assert prompt[0] == {"type": "string", "minLength": 1}
    assert all(alt.get("minItems") == 1 for alt in prompt[1:])
    params = comps["Parameters"]["properties"]
    assert params["top_p"]["exclusiveMinimum"] == 0 and params["top_p"]["exclusiveMaximum"] == 1
    assert params["max_new_tokens"]["minimum"] == 1 and params["stop"]["maxItems"] == 4
    assert comps["GenerateRequest"]["properties"]["inputs"]["minLength"] == 1
    assert comps["UserMessage"]["required"] == ["role", "content"]
    assert comps["AssistantMessage"]["required"] == ["role"]
    messages = comps["ChatCompletionRequest"]["properties"]["messages"]
    assert messages["minItems"] == 1
    assert messages["items"]["discriminator"]["propertyName"] == "role"


async def test_choice_rules_match_the_server(app) -> None:
    """n and best_of: the schema accepts a body exactly when the server does (JSON Schema cannot
    compare two fields, so best_of >= n is written out per value of n)."""
    jsonschema = pytest.importorskip("jsonschema")
    schema = app.openapi()
    comps = schema["components"]["schemas"]
    assert comps["CompletionRequest"]["properties"]["n"]["maximum"] == 16
    assert comps["Parameters"]["properties"]["best_of"]["minimum"] == 1
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    cases = [("/v1/completions", {"prompt": "hi", "max_tokens": 1, **extra}) for extra in (
        {"n": 2}, {"n": 0}, {"n": 17}, {"n": None, "best_of": 2}, {"n": 3, "best_of": 2},
        {"n": 2, "best_of": 4}, {"best_of": 3, "stream": True}, {"n": 2, "best_of": 2,
                                                                 "stream": True},
        {"n": 2, "best_of": 3, "stream": True}, {"best_of": 17})]
    cases += [("/v1/chat/completions", {**chat, "n": n}) for n in (2, 16, 17)]
    tgi = {"max_new_tokens": 1}
    cases += [(route, {"inputs": "hi", "parameters": {**tgi, **extra}})
              for route in ("/generate", "/generate_stream") for extra in (
                  {"best_of": 2}, {"best_of": 2, "do_sample": True},
                  {"best_of": 2, "top_k": 5}, {"best_of": 2, "temperature": 0.5, "seed": 3},
                  {"best_of": 1, "seed": 3}, {"best_of": 0}, {"best_of": 17, "do_sample": True})]
    cases += [("/", {"inputs": "hi", "stream": stream, "parameters": {
        **tgi, "best_of": 2, "do_sample": True}}) for stream in (False, True)]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://test") as http:
        for path, body in cases:
            op = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]
            validator = jsonschema.Draft202012Validator({**op["schema"],
                                                         "components": {"schemas": comps}})
            r = await http.post(path, json=body, headers=AUTH)
            assert r.status_code in (200, 400, 422), r.text
            assert validator.is_valid(body) == (r.status_code == 200), (path, body, r.text)


async def test_observed_answers_are_declared(app) -> None:
    schema = app.openapi()
    seen: set[tuple[str, str, str, str]] = set()

    def note(method: str, path: str, r: httpx.Response) -> None:
        kind = r.headers["content-type"].split(";")[0]
        seen.add((method, path, str(r.status_code), kind))
        assert r.status_code in (200, 401) or r.status_code >= 400

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://test") as http:
        for (method, path) in ROUTES:
            url = path.replace("{model_id}", "tiny")
            body = GOOD.get(path)
            note(method, path, await http.request(method, url, json=body, headers=AUTH))
            note(method, path, await http.request(method, url, json=body))  # no key
            if path in STREAMS:
                note(method, path, await http.request(method, url, headers=AUTH,
                                                      json={**body, **STREAMS[path]}))
            for bad in BAD.get(path, []):
                note(method, path, await http.request(method, url, json=bad, headers=AUTH))
            if method == "post":
                note(method, path, await http.post(url, headers=AUTH,
                                                   json={"inputs": "x" * 5000}))  # 413
        note("get", "/v1/models/{model_id}", await http.get("/v1/models/nope", headers=AUTH))
    for method, path, status, kind in sorted(seen):
        assert kind in declared(schema, method, path).get(status, set()), (
            method, path, status, kind)
    statuses = {s for _, _, s, _ in seen}
    assert {"200", "400", "401", "404", "413", "422"} <= statuses


async def test_no_401_without_keys(llm: LLM, monkeypatch) -> None:
    monkeypatch.delenv("PDSERVE_API_KEYS", raising=False)
    schema = build_api(AsyncEngine(llm.engine), llm.tokenizer, "tiny", 2048).openapi()
    assert "securitySchemes" not in schema["components"]
    assert all("401" not in op["responses"] for ops in schema["paths"].values()
               for op in ops.values())

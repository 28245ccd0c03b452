"""Request validation of issue 16: chat messages checked per role, strict types (no bool-as-int,
no float-as-bool, no number-as-string, no fractional integers; an integral float such as 2.0 is
the integer it equals, as JSON Schema's `integer` says) on both API families, and a body that
is not UTF-8 answered as bad input in the route family's shape (400 on /v1, 422 on TGI
routes)."""

from __future__ import annotations

import httpx
import pytest

from api.server import build_api
from engine.llm import LLM
from tests.api_harness import client_for, serving_engine
from tests.test_api_errors import openai_error, tgi_error

pytestmark = pytest.mark.anyio
USER = {"role": "user", "content": "hi"}


@pytest.fixture
async def http(llm: LLM):
    async with serving_engine(llm) as engine, \
            client_for(build_api(engine, llm.tokenizer, "tiny", 2048)) as c:
        yield c


@pytest.mark.parametrize("messages, param, words", [
    ([{"role": "user"}], "messages.0.content", "Field required"),
    ([{"role": "user", "content": None}], "messages.0.content", "valid string"),
    ([{"role": "system"}, USER], "messages.0.content", "Field required"),
    ([{"role": "developer"}, USER], "messages.0.content", "Field required"),
    ([{"content": "hi"}], "messages.0.role", "role is required"),
    ([{"role": "tool", "content": "x"}], "messages.0.role", "unknown role 'tool'"),
    ([{"role": "user", "content": 5}], "messages.0.content", "valid string"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     "messages.0.content", ""),
    ([{"role": "user", "content": [{"type": "text"}]}], "messages.0.content", ""),
    ([{"role": True, "content": "hi"}], "messages.0.role", "role"),
])
async def test_chat_message_roles(http: httpx.AsyncClient, messages: list, param: str,
                                  words: str) -> None:
    err = openai_error(await http.post("/v1/chat/completions", json={"messages": messages}))
    assert err["param"] == param and words in err["message"]


async def test_chat_content_forms_agree(http: httpx.AsyncClient) -> None:
    """Text parts are joined into the content string; an assistant turn may have none."""
    base = {"max_tokens": 3, "temperature": 0}

    async def text(messages: list) -> str:
        r = await http.post("/v1/chat/completions", json={**base, "messages": messages})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    plain = await text([{"role": "system", "content": "be brief"}, {"role": "user",
                                                                    "content": "hi there"}])
    parts = await text([{"role": "system", "content": [{"type": "text", "text": "be brief"}]},
                        {"role": "user", "content": [{"type": "text", "text": "hi "},
                                                     {"type": "text", "text": "there"}]}])
    developer = await text([{"role": "developer", "content": "be brief"},
                            {"role": "user", "content": "hi there"}])
    assert parts == plain == developer
    await text([USER, {"role": "assistant"}, USER])
    await text([USER, {"role": "assistant", "content": None, "tool_calls": []}, USER])


@pytest.mark.parametrize("field, value", [
    ("seed", True), ("max_tokens", True), ("max_tokens", "5"), ("max_tokens", 2.5),
    ("stream", 1), ("ignore_eos", 0.0), ("temperature", True), ("temperature", "0.5"),
    ("top_k", False), ("stop_token_ids", [True]), ("logprobs", True),
])
async def test_openai_types_are_strict(http: httpx.AsyncClient, field: str, value) -> None:
    err = openai_error(await http.post("/v1/completions", json={"prompt": "hi", field: value}))
    assert err["param"].split(".")[0] == field
    chat = {"messages": [USER], field: value}
    if field != "logprobs":  # chat's logprobs is a bool: True is its valid value
        assert openai_error(await http.post("/v1/chat/completions",
                                            json=chat))["param"].split(".")[0] == field


@pytest.mark.parametrize("field, value", [
    ("return_full_text", 0.0), ("seed", True), ("do_sample", 1), ("details", "true"),
    ("max_new_tokens", True), ("max_new_tokens", 3.5), ("temperature", True),
    ("top_n_tokens", False), ("truncate", "2"), ("stop", "x"),
])
async def test_tgi_types_are_strict(http: httpx.AsyncClient, field: str, value) -> None:
    for route in ("/generate", "/generate_stream", "/"):
        body = {"inputs": "hi", "parameters": {field: value}}
        assert f"parameters.{field}" in tgi_error(await http.post(route, json=body))
    assert "stream" in tgi_error(await http.post("/", json={"inputs": "hi", "stream": 1}))


async def test_integral_floats_are_integers(http: httpx.AsyncClient, llm: LLM) -> None:
    """Schemathesis sent `"max_new_tokens": 1.0` (a JSON Schema integer) and got a 422: every
    integer field takes an integral float as the integer it equals, in lists of token ids too."""
    ids = llm.tokenizer.encode("hi")
    r = await http.post("/v1/completions", json={
        "prompt": [float(t) for t in ids], "max_tokens": 3.0, "n": 2.0, "best_of": 2.0,
        "seed": 7.0, "top_k": 5.0, "logprobs": 1.0, "stop_token_ids": [1.0]})
    assert r.status_code == 200, r.text
    ints = (await http.post("/v1/completions", json={
        "prompt": ids, "max_tokens": 3, "n": 2, "best_of": 2, "seed": 7, "top_k": 5,
        "logprobs": 1, "stop_token_ids": [1]})).json()
    for got, want in zip(r.json()["choices"], ints["choices"], strict=True):
        assert got["text"] == want["text"]  # seeded: the same tokens (logprobs up to rounding)
        assert got["logprobs"]["tokens"] == want["logprobs"]["tokens"]
        assert got["logprobs"]["token_logprobs"] == pytest.approx(
            want["logprobs"]["token_logprobs"], abs=1e-4)
    r = await http.post("/v1/chat/completions", json={
        "messages": [USER], "max_tokens": 2.0, "logprobs": True, "top_logprobs": 2.0})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 2
    params = {"max_new_tokens": 2.0, "top_k": 3.0, "seed": 4.0, "truncate": 1.0,
              "top_n_tokens": 1.0, "details": True}
    for route in ("/generate", "/tokenize"):
        r = await http.post(route, json={"inputs": "hi", "parameters": params})
        assert r.status_code == 200, r.text
    details = (await http.post("/generate", json={"inputs": "hi", "parameters": params})
               ).json()["details"]
    assert details["generated_tokens"] == 2 and details["seed"] == 4
    r = await http.post("/generate_stream", json={"inputs": "hi", "parameters": {
        "max_new_tokens": 2.0}})
    assert r.status_code == 200 and r.text.count("data:") == 2


async def test_body_not_utf8(http: httpx.AsyncClient) -> None:
    raw = {"content-type": "application/json"}
    for route in ("/generate", "/generate_stream", "/"):
        msg = tgi_error(await http.post(route, content=b'{"inputs": "\xff\xfe\xfa"}',
                                        headers=raw))
        assert "UTF-8" in msg
    for route in ("/v1/completions", "/v1/chat/completions"):
        err = openai_error(await http.post(route, content=b'{"prompt": "\xc3("}', headers=raw))
        assert err["type"] == "invalid_request_error" and "UTF-8" in err["message"]

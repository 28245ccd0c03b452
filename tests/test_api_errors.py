"""Error bodies and statuses: OpenAI shape with 400 on /v1/*, TGI shape with 422 on TGI routes,
for bad values, wrong types, bad JSON, over-long prompts (both numbers stated), refusals by the
engine, and server failures before and during a stream (an error event, never a hang)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest

from api.server import build_api
from engine.llm import LLM
from engine.outputs import RequestOutput
from tests.api_harness import client_for, serving_engine

pytestmark = pytest.mark.anyio


@pytest.fixture
async def http(llm: LLM):
    async with serving_engine(llm) as engine, \
            client_for(build_api(engine, llm.tokenizer, "tiny", 2048)) as c:
        yield c


def openai_error(r: httpx.Response, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert list(body) == ["error"]
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def tgi_error(r: httpx.Response, status: int = 422, kind: str = "validation") -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "error_type"} and body["error_type"] == kind
    return body["error"]


LONG_IDS = [10] * 2100


@pytest.mark.parametrize("body, param, words", [
    ({"prompt": ""}, "prompt", "empty"),
    ({"prompt": []}, "prompt", "empty"),
    ({"prompt": [[1, 2], []]}, "prompt", "empty"),
    ({"prompt": "hi", "temperature": -1}, "temperature", "greater than or equal to 0"),
    ({"prompt": "hi", "n": 17}, "n", "between 1 and 16"),
    ({"prompt": [1, 99999]}, "prompt", "99999 is outside the vocabulary [0, 2000)"),
    ({"prompt": [[1], [-1]]}, "prompt", "-1 is outside"),
    ({"prompt": "hi", "max_tokens": "many"}, "max_tokens", "integer"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens", "only allowed with echo=true"),
    ({"prompt": 5}, "prompt", "valid string"),
    ({"prompt": [1, "a"]}, None, ""),
    ({"max_tokens": 3}, "prompt", "Field required"),
    ({"prompt": "hi", "max_tokens": -1, "echo": True}, "max_tokens", "greater than or equal to 0"),
    ({"prompt": "hi", "presence_penalty": 0.5}, "presence_penalty", "not supported"),
    ({"prompt": "hi", "top_p": 0}, "top_p", "greater than 0"),
    ({"prompt": "hi", "logprobs": 50}, "logprobs", "less than or equal to 20"),
    ({"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options", "stream"),
    ({"prompt": "hi", "stop": [""]}, None, "stop strings"),
    ({"prompt": "hi", "seed": -3}, "seed", "greater than or equal to 0"),
    ({"prompt": LONG_IDS}, "prompt", "2100 tokens, but this model's maximum context length "
                                     "is 2048"),
    ({"prompt": [10] * 2000, "max_tokens": 100}, "max_tokens",
     "2048 tokens, but 2100 were requested (2000 in the prompt, 100 for max_tokens)"),
])
async def test_completion_errors(http: httpx.AsyncClient, body: dict, param: str | None,
                                 words: str) -> None:
    err = openai_error(await http.post("/v1/completions", json=body))
    assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param
    assert words in err["message"]


async def test_long_text_prompt_states_both_numbers(http: httpx.AsyncClient, llm: LLM) -> None:
    text = "hello " * 2100
    n = len(llm.tokenizer.encode(text))
    err = openai_error(await http.post("/v1/completions", json={"prompt": text}))
    assert f"{n} tokens" in err["message"] and "2048" in err["message"]
    assert err["code"] == "context_length_exceeded"
    msg = tgi_error(await http.post("/generate", json={"inputs": text}))
    assert f"{n} tokens" in msg and "2048" in msg


async def test_bad_json_and_unknown_model(http: httpx.AsyncClient) -> None:
    for content in (b"{not json", b"[1, 2]", b""):
        r = await http.post("/v1/completions", content=content,
                            headers={"content-type": "application/json"})
        assert openai_error(r)["type"] == "invalid_request_error"
        tgi_error(await http.post("/generate", content=content,
                                  headers={"content-type": "application/json"}))
    err = openai_error(await http.post("/v1/completions", json={"model": "gpt-9", "prompt": "x"}),
                       404)
    assert err["code"] == "model_not_found" and "gpt-9" in err["message"]
    assert openai_error(await http.get("/v1/nothing-here"), 404)["message"]


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "tools"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 0}, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000}, "max_tokens"),
])
async def test_chat_errors(http: httpx.AsyncClient, body: dict, param: str) -> None:
    err = openai_error(await http.post("/v1/chat/completions", json=body))
    assert err["param"] == param


@pytest.mark.parametrize("route", ["/generate", "/generate_stream", "/"])
@pytest.mark.parametrize("body, words", [
    ({"inputs": ""}, "`inputs` cannot be empty"),
    ({"parameters": {}}, "inputs: Field required"),
    ({"inputs": 3}, "valid string"),
    ({"inputs": "hi", "parameters": {"temperature": 0}}, "`temperature` must be strictly"),
    ({"inputs": "hi", "parameters": {"top_p": 1.0}}, "`top_p` must be > 0.0 and < 1.0"),
    ({"inputs": "hi", "parameters": {"top_k": 0}}, "`top_k`"),
    ({"inputs": "hi", "parameters": {"max_new_tokens": 0}}, "`max_new_tokens`"),
    ({"inputs": "hi", "parameters": {"max_new_tokens": "x"}}, "max_new_tokens"),
    ({"inputs": "hi", "parameters": {"truncate": 0}}, "`truncate`"),
    ({"inputs": "hi", "parameters": {"repetition_penalty": -1}}, "`repetition_penalty`"),
    ({"inputs": "hi", "parameters": {"max_new_tokens": 2047}}, "2048"),
])
async def test_tgi_errors(http: httpx.AsyncClient, route: str, body: dict, words: str) -> None:
    assert words in tgi_error(await http.post(route, json={"stream": True, **body}))


class FailingClient:
    """Refuses, fails at once, or fails after one output, as told; records that it closed."""

    def __init__(self, mode: str) -> None:
        self.mode, self.closed = mode, 0

    async def generate(self, prompt_ids: list[int], params, request_id: str,
                       ) -> AsyncIterator[RequestOutput]:
        try:
            if self.mode == "refuse":
                raise ValueError("the engine refuses this")
            if self.mode == "crash":
                raise RuntimeError("replica died")
            yield RequestOutput(request_id, [42], "ok", False, num_output_tokens=1)
            if self.mode == "error-output":
                yield RequestOutput(request_id, [], "", True, "abort", error="KV transfer lost")
            raise RuntimeError("replica died mid-stream")
        finally:
            self.closed += 1


async def test_engine_refusal_and_crash(llm: LLM) -> None:
    for mode, oai_status, tgi_status, kind in [("refuse", 400, 422, "validation"),
                                               ("crash", 500, 424, "generation")]:
        fake = FailingClient(mode)
        async with client_for(build_api(fake, llm.tokenizer, "tiny", 2048)) as http:
            for stream in (False, True):
                err = openai_error(await http.post("/v1/completions", json={
                    "prompt": "hi", "stream": stream}), oai_status)
                assert ("refuses" if mode == "refuse" else "replica died") in err["message"]
                tgi_error(await http.post("/generate_stream" if stream else "/generate",
                                          json={"inputs": "hi"}), tgi_status, kind)
        assert fake.closed == 4


@pytest.mark.parametrize("mode", ["mid-stream", "error-output"])
async def test_failure_mid_stream_ends_with_error_event(llm: LLM, mode: str) -> None:
    fake = FailingClient(mode)
    async with client_for(build_api(fake, llm.tokenizer, "tiny", 2048)) as http:
        r = await http.post("/v1/completions", json={"prompt": "hi", "stream": True})
        first, error, done = [e.removeprefix("data: ") for e in r.text.split("\n\n") if e]
        # The API makes the text from the token ids (the client's own "ok" is not used).
        assert json.loads(first)["choices"][0]["text"] == llm.tokenizer.decode([42])
        assert json.loads(error)["error"]["type"] == "server_error"
        assert done == "[DONE]"
        r = await http.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "stream": True})
        assert "server_error" in r.text and r.text.endswith("data: [DONE]\n\n")
        r = await http.post("/generate_stream", json={"inputs": "hi"})
        token, error = [json.loads(e.removeprefix("data:")) for e in r.text.split("\n\n") if e]
        assert token["token"]["id"] == 42
        assert error["error_type"] == "generation" and error["error"]
        # Non-streaming: the same failure is a 500 (OpenAI) / 424 (TGI) body.
        openai_error(await http.post("/v1/completions", json={"prompt": "hi"}), 500)
        tgi_error(await http.post("/generate", json={"inputs": "hi"}), 424, "generation")
    assert fake.closed == 5

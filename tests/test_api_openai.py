"""OpenAI routes over a real engine: outputs equal the in-process LLM's, streams concatenate to
the non-streamed text, usage and logprobs have the documented shapes; the official client works.
"""

from __future__ import annotations

import json

import httpx
import pytest
from openai import AsyncOpenAI

from api.server import build_api
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from tests.api_harness import client_for, serving_engine

pytestmark = pytest.mark.anyio
PROMPT = "Hello there, how are"
MODEL = "tiny-llama"


@pytest.fixture
async def app(llm: LLM):
    async with serving_engine(llm) as engine:
        yield build_api(engine, llm.tokenizer, MODEL, llm.engine.max_model_len)
        assert not llm.engine.has_unfinished()


@pytest.fixture
async def http(app):
    async with client_for(app) as c:
        yield c


def greedy(llm: LLM, prompt: str | list[int], n: int, **kw) -> tuple[str, list[int]]:
    c = llm.generate(prompt, SamplingParams(max_tokens=n, temperature=0.0, **kw))[0]
    return c.text, c.token_ids


def sse(text: str) -> list[str]:
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events), events
    return [e.removeprefix("data: ") for e in events]


def chat_ids(llm: LLM, messages: list[dict]) -> list[int]:
    text = llm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return llm.tokenizer.encode(text, add_special_tokens=False)


async def test_models(http: httpx.AsyncClient) -> None:
    r = await http.get("/v1/models")
    assert r.status_code == 200
    [card] = r.json()["data"]
    assert card["id"] == MODEL and card["object"] == "model" and card["max_model_len"] == 2048
    assert (await http.get(f"/v1/models/{MODEL}")).json()["id"] == MODEL


async def test_greedy_completion_equals_llm(http: httpx.AsyncClient, llm: LLM) -> None:
    text, ids = greedy(llm, PROMPT, 8)
    r = await http.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT,
                                                  "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    [choice] = body["choices"]
    assert choice["text"] == text and choice["finish_reason"] == "length"
    assert choice["index"] == 0 and choice["logprobs"] is None
    n_prompt = len(llm.tokenizer.encode(PROMPT))
    assert body["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 8,
                             "total_tokens": n_prompt + 8}


async def test_stream_concatenates_to_text(http: httpx.AsyncClient, llm: LLM) -> None:
    text, _ = greedy(llm, PROMPT, 8)
    r = await http.post("/v1/completions", json={
        "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    *text_chunks, usage_chunk = chunks
    assert "".join(c["choices"][0]["text"] for c in text_chunks) == text
    assert [c["choices"][0]["finish_reason"] for c in text_chunks][-1] == "length"
    assert all(c["usage"] is None for c in text_chunks)
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 8
    assert len({c["id"] for c in chunks}) == 1


async def test_token_ids_and_batched_prompts(http: httpx.AsyncClient, llm: LLM) -> None:
    ids = llm.tokenizer.encode(PROMPT)
    other = "The cat sat"
    r = await http.post("/v1/completions", json={"prompt": ids, "max_tokens": 6,
                                                  "temperature": 0})
    assert r.json()["choices"][0]["text"] == greedy(llm, ids, 6)[0]
    r = await http.post("/v1/completions", json={"prompt": [PROMPT, other], "max_tokens": 6,
                                                  "temperature": 0})
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert [c["text"] for c in body["choices"]] == [greedy(llm, p, 6)[0] for p in (PROMPT, other)]
    assert body["usage"]["completion_tokens"] == 12
    r = await http.post("/v1/completions", json={"prompt": [ids, ids[:3]], "max_tokens": 4,
                                                  "temperature": 0, "stream": True})
    chunks = [json.loads(e) for e in sse(r.text)[:-1]]
    for i, p in enumerate([ids, ids[:3]]):
        got = "".join(c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == i)
        assert got == greedy(llm, p, 4)[0]


async def test_logprobs_shapes(http: httpx.AsyncClient, llm: LLM) -> None:
    ref = llm.generate(PROMPT, SamplingParams(max_tokens=8, temperature=0.0, logprobs=2))[0]
    r = await http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8,
                                                  "temperature": 0, "logprobs": 2})
    lp = r.json()["choices"][0]["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert all(len(v) == 8 for v in lp.values())
    assert lp["tokens"] == [llm.tokenizer.decode([t]) for t in ref.token_ids]
    assert lp["token_logprobs"] == pytest.approx([x.logprob for x in ref.logprobs], abs=1e-5)
    for tok, top in zip(lp["tokens"], lp["top_logprobs"]):
        assert tok in top and 1 <= len(top) <= 3
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])


async def test_stop_string(http: httpx.AsyncClient, llm: LLM) -> None:
    text, _ = greedy(llm, PROMPT, 8)
    stop = text[5:8]
    r = await http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8,
                                                  "temperature": 0, "stop": stop})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["text"] == text[: text.index(stop)]


async def test_chat(http: httpx.AsyncClient, llm: LLM) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    ids = chat_ids(llm, messages)
    text, _ = greedy(llm, ids, 10)
    req = {"model": MODEL, "messages": messages, "max_tokens": 10, "temperature": 0}
    body = (await http.post("/v1/chat/completions", json=req)).json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    [choice] = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": text}
    assert body["usage"]["prompt_tokens"] == len(ids)
    assert body["usage"]["completion_tokens"] + len(ids) == body["usage"]["total_tokens"]

    r = await http.post("/v1/chat/completions", json={
        **req, "stream": True, "stream_options": {"include_usage": True}})
    events = sse(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [c["choices"][0]["delta"].get("content", "") for c in chunks[1:-1]]
    assert "".join(deltas) == text
    assert chunks[-2]["choices"][0]["finish_reason"] == choice["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == body["usage"]


async def test_chat_logprobs(http: httpx.AsyncClient) -> None:
    r = await http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        "max_tokens": 5, "temperature": 0, "logprobs": True, "top_logprobs": 2})
    body = r.json()
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"]
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["bytes"] == list(entry["token"].encode())
        assert len(entry["top_logprobs"]) == 2
        assert entry["top_logprobs"][0]["logprob"] >= entry["top_logprobs"][1]["logprob"]


async def test_official_client(app, llm: LLM) -> None:
    http_client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app))
    client = AsyncOpenAI(base_url="http://test/v1", api_key="none", http_client=http_client)
    text, _ = greedy(llm, PROMPT, 8)
    done = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8,
                                           temperature=0)
    assert done.choices[0].text == text and done.usage.completion_tokens == 8
    stream = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8,
                                             temperature=0, stream=True)
    assert "".join([c.choices[0].text async for c in stream]) == text

    messages = [{"role": "user", "content": "Tell me a story"}]
    chat_text, _ = greedy(llm, chat_ids(llm, messages), 8)
    stream = await client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True})
    parts, usage = [], None
    async for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        usage = chunk.usage or usage
    assert "".join(parts) == chat_text
    assert usage is not None and usage.completion_tokens >= 1
    await http_client.aclose()

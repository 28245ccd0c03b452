"""Prompt logprobs over HTTP: OpenAI completions `echo` + `logprobs` (lm-eval-harness's
loglikelihood request: prompt ids, `echo: true, logprobs: 1, max_tokens: 1`, and `max_tokens: 0`)
and TGI `decoder_input_details`, equal to HF's log-softmax within 1e-4; the shapes OpenAI and
TGI answer; what the schema declares about them."""

from __future__ import annotations

import json

import httpx
import pytest
from openai import AsyncOpenAI

from api.server import build_api
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from tests.api_harness import client_for, serving_engine
from tests.test_prompt_logprobs import _hf_logprobs

pytestmark = pytest.mark.anyio
MODEL = "tiny-llama"
PROMPT = "The river runs to the sea"
TOL = 1e-4


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0)


@pytest.fixture
async def app(llm: LLM):
    async with serving_engine(llm) as engine:
        yield build_api(engine, llm.tokenizer, MODEL, llm.engine.max_model_len)
        assert not llm.engine.has_unfinished()


@pytest.fixture
async def http(app):
    async with client_for(app) as c:
        yield c


def hf_error(llm: LLM, ids: list[int], logprobs: list[float | None]) -> float:
    ref = _hf_logprobs(llm.engine.model_cfg.path, tuple(ids))
    assert logprobs[0] is None
    return max(abs(lp - ref[p - 1, ids[p]].item()) for p, lp in enumerate(logprobs) if p)


async def test_lm_eval_loglikelihood_request(http: httpx.AsyncClient, llm: LLM) -> None:
    """What lm-eval-harness sends: a batch of token-id prompts, echo, logprobs 1, one token;
    it reads token_logprobs[ctxlen:-1] and compares each to max(top_logprobs[i].values())."""
    prompts = [llm.tokenizer.encode(PROMPT), llm.tokenizer.encode("Hello there, how are you")]
    r = await http.post("/v1/completions", json={
        "model": MODEL, "prompt": prompts, "echo": True, "logprobs": 1, "max_tokens": 1,
        "temperature": 0, "seed": 1234})
    assert r.status_code == 200, r.text
    body = r.json()
    worst = 0.0
    for ids, choice in zip(prompts, body["choices"], strict=True):
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(ids) + 1
        assert len(lp["top_logprobs"]) == len(lp["text_offset"]) == len(ids) + 1
        assert lp["tokens"][:len(ids)] == [llm.tokenizer.decode([t]) for t in ids]
        assert lp["top_logprobs"][0] is None
        for tok, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
            assert tok in top.values() and 1 <= len(top) <= 2  # the top-1, and the token
            assert isinstance(tok, float) and tok <= 0
        worst = max(worst, hf_error(llm, ids, lp["token_logprobs"][:len(ids)]))
        assert choice["text"].startswith(llm.tokenizer.decode(ids))
        assert choice["finish_reason"] == "length"
    print(f"HTTP lm-eval request: max |logprob - HF| = {worst:.2e}")
    assert worst < TOL
    n_prompt = sum(map(len, prompts))
    assert body["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 2,
                             "total_tokens": n_prompt + 2}


async def test_echo_with_max_tokens_zero_scores_the_prompt_only(http, llm: LLM) -> None:
    ids = llm.tokenizer.encode(PROMPT)
    r = await http.post("/v1/completions", json={"prompt": PROMPT, "echo": True, "logprobs": 2,
                                                  "max_tokens": 0})
    assert r.status_code == 200, r.text
    [choice] = r.json()["choices"]
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) and lp["text_offset"][0] == 0
    assert all(len(top) in (2, 3) for top in lp["top_logprobs"][1:])
    assert hf_error(llm, ids, lp["token_logprobs"]) < TOL
    assert r.json()["usage"]["completion_tokens"] == 0
    # echo without logprobs: the prompt, then the completion
    r = await http.post("/v1/completions", json={"prompt": PROMPT, "echo": True, "max_tokens": 3,
                                                  "temperature": 0})
    text = llm.generate(PROMPT, _greedy(3))[0].text
    assert r.json()["choices"][0]["text"] == PROMPT + text
    assert r.json()["choices"][0]["logprobs"] is None
    r = await http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


async def test_echo_stream_sends_the_prompt_first(http: httpx.AsyncClient, llm: LLM) -> None:
    ids = llm.tokenizer.encode(PROMPT)
    r = await http.post("/v1/completions", json={"prompt": PROMPT, "echo": True, "logprobs": 0,
                                                  "max_tokens": 4, "temperature": 0,
                                                  "stream": True})
    events = [e.removeprefix("data: ") for e in r.text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert chunks[0]["text"] == PROMPT and chunks[0]["finish_reason"] is None
    assert len(chunks[0]["logprobs"]["tokens"]) == len(ids)
    assert hf_error(llm, ids, chunks[0]["logprobs"]["token_logprobs"]) < TOL
    assert "".join(c["text"] for c in chunks) == PROMPT + llm.generate(PROMPT, _greedy(4))[0].text
    assert chunks[1]["logprobs"]["text_offset"][0] == len(PROMPT)
    r = await http.post("/v1/completions", json={"prompt": PROMPT, "echo": True, "logprobs": 0,
                                                  "max_tokens": 0, "stream": True})
    events = [e.removeprefix("data: ") for e in r.text.split("\n\n") if e]
    [only] = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert only["text"] == PROMPT and only["finish_reason"] == "length"


async def test_openai_client_echo(app, llm: LLM) -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://test/v1") as h:
        client = AsyncOpenAI(base_url="http://test/v1", api_key="none", http_client=h)
        c = await client.completions.create(model=MODEL, prompt=PROMPT, echo=True, logprobs=1,
                                            max_tokens=0)
    lp = c.choices[0].logprobs
    assert c.choices[0].text == PROMPT and lp.token_logprobs[0] is None
    assert hf_error(llm, llm.tokenizer.encode(PROMPT), lp.token_logprobs) < TOL


async def test_tgi_decoder_input_details(http: httpx.AsyncClient, llm: LLM) -> None:
    ids = llm.tokenizer.encode(PROMPT)
    r = await http.post("/generate", json={"inputs": PROMPT, "parameters": {
        "max_new_tokens": 2, "decoder_input_details": True}})
    assert r.status_code == 200, r.text
    details = r.json()["details"]  # decoder_input_details turns details on, as in TGI
    prefill = details["prefill"]
    assert [t["id"] for t in prefill] == ids
    assert [t["text"] for t in prefill] == [llm.tokenizer.decode([t]) for t in ids]
    assert set(prefill[0]) == {"id", "text", "logprob"} and prefill[0]["logprob"] is None
    worst = hf_error(llm, ids, [t["logprob"] for t in prefill])
    print(f"HTTP TGI prefill: max |logprob - HF| = {worst:.2e}")
    assert worst < TOL
    assert len(details["tokens"]) == 2
    r = await http.post("/generate", json={"inputs": PROMPT, "parameters": {"details": True}})
    assert r.json()["details"]["prefill"] == []
    for path, body in (("/generate_stream", {}), ("/", {"stream": True})):
        r = await http.post(path, json={"inputs": PROMPT, **body,
                                        "parameters": {"decoder_input_details": True}})
        assert r.status_code == 422
        assert r.json() == {"error": "`decoder_input_details` == true is not supported when "
                                     "streaming tokens", "error_type": "validation"}


async def test_schema_declares_echo_and_prefill_constraints(http: httpx.AsyncClient) -> None:
    schema = (await http.get("/openapi.json")).json()
    comp = schema["components"]["schemas"]["CompletionRequest"]
    max_tokens = comp["properties"]["max_tokens"]
    assert {"minimum": 0} in [{"minimum": a.get("minimum")} for a in max_tokens["anyOf"]]
    assert comp["if"]["properties"]["max_tokens"] == {"const": 0}
    assert comp["then"]["properties"]["echo"] == {"const": True}
    for path in ("/generate_stream", "/"):
        body = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        assert len(body["schema"]["allOf"]) == 2
        assert "decoder_input_details" in json.dumps(body["schema"]["allOf"][1])
    gen = schema["paths"]["/generate"]["post"]["requestBody"]["content"]["application/json"]
    assert "allOf" not in gen["schema"]  # /generate takes decoder_input_details

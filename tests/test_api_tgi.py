"""TGI routes over a real engine: /generate details carry the LLM's token ids, /generate_stream
sends one event per token with the full text and details on the last, `/` dispatches on
`stream`, truncate / return_full_text / seeded sampling behave as in TGI; a matched stop sequence
stays in generated_text and in its token's text, as TGI leaves it; /tokenize and /info have TGI's
shapes."""

from __future__ import annotations

import json

import httpx
import pytest

from api.server import build_api
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from tests.api_harness import client_for, serving_engine

pytestmark = pytest.mark.anyio
PROMPT = "Once upon a time"


@pytest.fixture
async def http(llm: LLM):
    async with serving_engine(llm) as engine, client_for(
            build_api(engine, llm.tokenizer, "tiny-llama", llm.engine.max_model_len)) as c:
        yield c


def greedy(llm: LLM, prompt: str | list[int], n: int):
    return llm.generate(prompt, SamplingParams(max_tokens=n, temperature=0.0, logprobs=0))[0]


def events(text: str) -> list[dict]:
    raw = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data:{") for e in raw), raw  # TGI style: no space after "data:"
    return [json.loads(e.removeprefix("data:")) for e in raw]


async def test_generate_details(http: httpx.AsyncClient, llm: LLM) -> None:
    ref = greedy(llm, PROMPT, 6)
    r = await http.post("/generate", json={"inputs": PROMPT, "parameters": {
        "max_new_tokens": 6, "details": True, "decoder_input_details": True}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["generated_text"] == ref.text
    d = body["details"]
    assert d["finish_reason"] == "length" and d["generated_tokens"] == 6
    assert d["seed"] is None  # greedy
    prompt_ids = llm.tokenizer.encode(PROMPT)  # the prefill: every prompt token, first null
    assert [t["id"] for t in d["prefill"]] == prompt_ids and d["prefill"][0]["logprob"] is None
    assert all(t["logprob"] < 0 for t in d["prefill"][1:])
    assert [t["id"] for t in d["tokens"]] == ref.token_ids
    assert [t["logprob"] for t in d["tokens"]] == pytest.approx(
        [x.logprob for x in ref.logprobs], abs=1e-5)
    assert "".join(t["text"] for t in d["tokens"]) == ref.text
    assert all(t["special"] is False for t in d["tokens"])

    plain = (await http.post("/generate", json={"inputs": PROMPT,
                                                "parameters": {"max_new_tokens": 6}})).json()
    assert plain == {"generated_text": ref.text}


async def test_generate_stream(http: httpx.AsyncClient, llm: LLM) -> None:
    ref = greedy(llm, PROMPT, 5)
    r = await http.post("/generate_stream", json={"inputs": PROMPT,
                                                  "parameters": {"max_new_tokens": 5}})
    assert r.headers["content-type"].startswith("text/event-stream")
    evs = events(r.text)
    assert [e["token"]["id"] for e in evs] == ref.token_ids
    assert [e["index"] for e in evs] == [1, 2, 3, 4, 5]
    assert all(e["generated_text"] is None and e["details"] is None for e in evs[:-1])
    assert evs[-1]["generated_text"] == ref.text
    assert "".join(e["token"]["text"] for e in evs) == ref.text
    assert evs[-1]["details"] == {"finish_reason": "length", "generated_tokens": 5,
                                  "seed": None,
                                  "input_length": len(llm.tokenizer.encode(PROMPT))}


async def test_compat_route(http: httpx.AsyncClient, llm: LLM) -> None:
    ref = greedy(llm, PROMPT, 3)
    req = {"inputs": PROMPT, "parameters": {"max_new_tokens": 3}}
    assert (await http.post("/", json=req)).json() == [{"generated_text": ref.text}]
    evs = events((await http.post("/", json={**req, "stream": True})).text)
    assert evs[-1]["generated_text"] == ref.text


async def test_truncate_and_full_text(http: httpx.AsyncClient, llm: LLM) -> None:
    ids = llm.tokenizer.encode(PROMPT)
    ref = greedy(llm, ids[-2:], 4)
    r = await http.post("/generate", json={"inputs": PROMPT, "parameters": {
        "max_new_tokens": 4, "truncate": 2, "return_full_text": True, "details": True}})
    body = r.json()
    assert [t["id"] for t in body["details"]["tokens"]] == ref.token_ids
    assert body["generated_text"] == PROMPT + ref.text


async def test_sampling_seed_and_stop(http: httpx.AsyncClient, llm: LLM) -> None:
    params = {"max_new_tokens": 6, "do_sample": True, "seed": 1234, "details": True}
    a = (await http.post("/generate", json={"inputs": PROMPT, "parameters": params})).json()
    b = (await http.post("/generate", json={"inputs": PROMPT, "parameters": params})).json()
    assert a == b and a["details"]["seed"] == 1234
    unseeded = {"max_new_tokens": 2, "temperature": 0.7, "details": True}
    c = (await http.post("/generate", json={"inputs": PROMPT, "parameters": unseeded})).json()
    assert isinstance(c["details"]["seed"], int)  # sampling: a seed is picked and reported



async def test_stop_sequence_stays_in_the_text(http: httpx.AsyncClient, llm: LLM) -> None:
    ref = greedy(llm, PROMPT, 8)
    text = ref.text
    stop = text[3:6]
    kept = text[: text.index(stop) + len(stop)]
    # The stop completes inside this token: the request ends there.
    n = next(i for i in range(1, 9)
             if len(llm.tokenizer.decode(ref.token_ids[:i])) >= len(kept))
    params = {"max_new_tokens": 8, "stop": [stop, "never-generated"], "details": True}
    body = (await http.post("/generate", json={"inputs": PROMPT, "parameters": params})).json()
    assert body["generated_text"] == kept
    d = body["details"]
    assert d["finish_reason"] == "stop_sequence" and d["generated_tokens"] == n
    assert [t["id"] for t in d["tokens"]] == ref.token_ids[:n]
    assert "".join(t["text"] for t in d["tokens"]) == kept and d["tokens"][-1]["text"]
    evs = events((await http.post("/generate_stream", json={"inputs": PROMPT,
                                                            "parameters": params})).text)
    assert evs[-1]["generated_text"] == kept
    assert "".join(e["token"]["text"] for e in evs) == kept
    assert evs[-1]["details"]["finish_reason"] == "stop_sequence"


async def test_info(http: httpx.AsyncClient) -> None:
    info = (await http.get("/info")).json()
    assert info["model_id"] == "tiny-llama"
    assert info["max_total_tokens"] == 2048 and info["max_input_tokens"] == 2047
    assert {"model_id", "model_sha", "model_pipeline_tag", "max_concurrent_requests",
            "max_best_of", "max_stop_sequences", "max_input_tokens", "max_total_tokens",
            "validation_workers", "max_client_batch_size", "router", "version", "sha",
            "docker_label"} <= set(info)


async def test_tokenize(http: httpx.AsyncClient, llm: LLM) -> None:
    text = "Hello wörld"
    r = await http.post("/tokenize", json={"inputs": text, "parameters": {"max_new_tokens": 3}})
    assert r.status_code == 200, r.text
    toks = r.json()
    assert [t["id"] for t in toks] == llm.tokenizer.encode(text)
    assert all(set(t) == {"id", "text", "start", "stop"} for t in toks)
    assert all(t["text"] == text[t["start"]:t["stop"]] for t in toks)
    assert toks[0]["id"] == llm.tokenizer.bos_token_id and toks[0]["text"] == ""
    # Byte tokens of one character share its span (as in TGI): the last token ends the text.
    assert toks[-1]["stop"] == len(text)
    r = await http.post("/tokenize", json={"inputs": ""})
    assert r.status_code == 422 and r.json()["error_type"] == "validation"
    # truncate keeps the last tokens, as /generate does; the other parameters are not read
    r = await http.post("/tokenize", json={"inputs": text, "parameters": {
        "truncate": 2, "top_p": 1.0, "stop": [""]}})
    assert r.json() == toks[-2:]

"""Several choices per prompt over a real engine: OpenAI `n` (completions and chat) and
`best_of` (completions), TGI `best_of`. Greedy choices equal the n=1 answer; seeded choice i is
the n=1 request with seed + i, and the same request gives the same choices; best_of returns the
candidates with the highest mean token logprob; usage counts the prompt once per prompt and
every generated token; streams number their choices; bad values get their route family's 4xx;
one refused choice closes those that started."""

from __future__ import annotations

import json

import httpx
import pytest

from api.choices import choice_jobs
from api.server import build_api
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from tests.api_harness import client_for, serving_engine

pytestmark = pytest.mark.anyio
PROMPT = "Hello there, how are"
SAMPLED = {"temperature": 1.0, "max_tokens": 6, "ignore_eos": True}


@pytest.fixture
async def http(llm: LLM):
    async with serving_engine(llm) as engine, client_for(
            build_api(engine, llm.tokenizer, "tiny", llm.engine.max_model_len)) as c:
        yield c
        assert not llm.engine.has_unfinished()


async def complete(http: httpx.AsyncClient, **body) -> dict:
    r = await http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def sse(text: str) -> list[dict]:
    events = [e.removeprefix("data: ") for e in text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def mean(logprobs: list[float]) -> float:
    return sum(logprobs) / len(logprobs)


async def test_greedy_choices_equal_the_single_answer(http: httpx.AsyncClient, llm: LLM) -> None:
    ref = llm.generate(PROMPT, SamplingParams(max_tokens=8, temperature=0.0))[0]
    body = await complete(http, prompt=PROMPT, max_tokens=8, temperature=0, n=3)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [c["text"] for c in body["choices"]] == [ref.text] * 3
    n_prompt = len(llm.tokenizer.encode(PROMPT))
    assert body["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 3 * 8,
                             "total_tokens": n_prompt + 24}

    messages = [{"role": "user", "content": "Tell me a story"}]
    req = {"messages": messages, "max_tokens": 5, "temperature": 0}
    one = (await http.post("/v1/chat/completions", json=req)).json()
    two = (await http.post("/v1/chat/completions", json={**req, "n": 2})).json()
    assert [c["index"] for c in two["choices"]] == [0, 1]
    assert [c["message"] for c in two["choices"]] == [one["choices"][0]["message"]] * 2
    assert two["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"]
    assert two["usage"]["completion_tokens"] == 2 * one["usage"]["completion_tokens"]


async def test_seeded_choices_are_reproducible(http: httpx.AsyncClient) -> None:
    first = await complete(http, prompt=PROMPT, n=3, seed=11, **SAMPLED)
    again = await complete(http, prompt=PROMPT, n=3, seed=11, **SAMPLED)
    texts = [c["text"] for c in first["choices"]]
    assert [c["text"] for c in again["choices"]] == texts
    for i in range(3):  # choice i is the single request with seed 11 + i
        alone = await complete(http, prompt=PROMPT, seed=11 + i, **SAMPLED)
        assert alone["choices"][0]["text"] == texts[i]
    assert len(set(texts)) == 3

    # Without a seed each choice is a request with no seed of its own, so each draws its own
    # numbers (whether two texts then differ is chance, so that is not asserted).
    unseeded = choice_jobs([([1, 2], SamplingParams(temperature=1.0), "r")], 3)
    assert [(rid, p.seed) for _, p, rid in unseeded] == [("r", None), ("r-1", None),
                                                         ("r-2", None)]


async def test_batch_of_prompts_with_n(http: httpx.AsyncClient, llm: LLM) -> None:
    prompts = [PROMPT, "The cat sat"]
    refs = [llm.generate(p, SamplingParams(max_tokens=4, temperature=0.0))[0].text
            for p in prompts]
    body = await complete(http, prompt=prompts, max_tokens=4, temperature=0, n=2)
    # OpenAI's numbering: prompt_index * n + choice
    assert [(c["index"], c["text"]) for c in body["choices"]] == [
        (0, refs[0]), (1, refs[0]), (2, refs[1]), (3, refs[1])]
    n_prompts = sum(len(llm.tokenizer.encode(p)) for p in prompts)
    assert body["usage"]["prompt_tokens"] == n_prompts  # each prompt once
    assert body["usage"]["completion_tokens"] == 4 * 4


async def test_best_of_returns_the_highest_mean_logprob(http: httpx.AsyncClient) -> None:
    # The four candidates of best_of=4 are the choices of n=4 with the same seed.
    all4 = await complete(http, prompt=PROMPT, n=4, seed=5, logprobs=0, **SAMPLED)
    scores = [mean(c["logprobs"]["token_logprobs"]) for c in all4["choices"]]
    ranked = sorted(range(4), key=lambda i: -scores[i])
    # far apart, so float rounding between batches cannot reorder them
    assert all(scores[a] - scores[b] > 1e-3 for a, b in zip(ranked, ranked[1:])), scores

    body = await complete(http, prompt=PROMPT, n=2, best_of=4, seed=5, logprobs=0, **SAMPLED)
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert [c["text"] for c in body["choices"]] == [all4["choices"][i]["text"]
                                                    for i in ranked[:2]]
    # (the same tokens in another batch: logprobs equal up to float rounding)
    assert [mean(c["logprobs"]["token_logprobs"]) for c in body["choices"]] == pytest.approx(
        [scores[i] for i in ranked[:2]], abs=1e-5)
    assert body["usage"]["completion_tokens"] == 4 * 6  # every candidate was generated
    assert body["usage"]["prompt_tokens"] == all4["usage"]["prompt_tokens"]

    plain = await complete(http, prompt=PROMPT, best_of=4, seed=5, **SAMPLED)
    [choice] = plain["choices"]
    assert choice["text"] == all4["choices"][ranked[0]]["text"]
    assert choice["logprobs"] is None  # ranked by logprobs the client did not ask for


async def test_streamed_choices(http: httpx.AsyncClient) -> None:
    req = {"prompt": PROMPT, "n": 2, "seed": 3, **SAMPLED}
    whole = await complete(http, **req)
    r = await http.post("/v1/completions", json={**req, "stream": True, "best_of": 2,
                                                  "stream_options": {"include_usage": True}})
    *chunks, last = sse(r.text)
    indexes = [c["choices"][0]["index"] for c in chunks]
    assert sorted(set(indexes)) == [0, 1]
    for i in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert "".join(c["text"] for c in mine) == whole["choices"][i]["text"]
        assert [c["finish_reason"] for c in mine if c["finish_reason"]] == ["length"]
    assert last["choices"] == [] and last["usage"] == whole["usage"]

    chat = {"messages": [{"role": "user", "content": "Hi"}], "n": 2, "seed": 3, **SAMPLED}
    whole = (await http.post("/v1/chat/completions", json=chat)).json()
    r = await http.post("/v1/chat/completions", json={
        **chat, "stream": True, "stream_options": {"include_usage": True}})
    *chunks, last = sse(r.text)
    assert [c["choices"] for c in chunks[:2]] == [
        [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
          "finish_reason": None}] for i in (0, 1)]
    for i in (0, 1):
        mine = [c["choices"][0] for c in chunks[2:] if c["choices"][0]["index"] == i]
        assert "".join(c["delta"].get("content", "") for c in mine) == \
            whole["choices"][i]["message"]["content"]
        assert [c["finish_reason"] for c in mine if c["finish_reason"]] == ["length"]
    assert last["usage"] == whole["usage"]


@pytest.mark.parametrize("path, body, param, words", [
    ("/v1/completions", {"n": 0}, "n", "n must be between 1 and 16, got n=0"),
    ("/v1/completions", {"n": 17}, "n", "n must be between 1 and 16, got n=17"),
    ("/v1/completions", {"n": True}, "n", "valid integer"),
    ("/v1/completions", {"best_of": 0}, "best_of", "between 1 and 16, got best_of=0"),
    ("/v1/completions", {"best_of": 17, "n": 2}, "best_of", "got best_of=17"),
    ("/v1/completions", {"best_of": 2, "n": 3}, "best_of",
     "best_of must be greater than or equal to n, got best_of=2 and n=3"),
    ("/v1/completions", {"best_of": 3, "n": 2, "stream": True}, "best_of",
     "best_of cannot be streamed"),
    ("/v1/chat/completions", {"n": 17}, "n", "n must be between 1 and 16, got n=17"),
])
async def test_openai_refusals(http: httpx.AsyncClient, path: str, body: dict, param: str,
                               words: str) -> None:
    base = ({"prompt": "hi"} if path == "/v1/completions"
            else {"messages": [{"role": "user", "content": "hi"}]})
    r = await http.post(path, json={**base, "max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"]
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("route, body, words", [
    ("/generate", {"best_of": 2}, "you must use sampling when `best_of` is > 1"),
    ("/generate", {"best_of": 2, "do_sample": True, "seed": 1},
     "`seed` must not be set when `best_of` > 1"),
    ("/generate", {"best_of": 17, "do_sample": True}, "`best_of` must be > 0 and <= 16. Given: 17"),
    ("/generate", {"best_of": 0}, "`best_of` must be > 0 and <= 16. Given: 0"),
    ("/generate_stream", {"best_of": 2, "do_sample": True},
     "`best_of` != 1 is not supported when streaming tokens"),
    ("/", {"best_of": 2, "do_sample": True, "stream": True},
     "`best_of` != 1 is not supported when streaming tokens"),
])
async def test_tgi_refusals(http: httpx.AsyncClient, route: str, body: dict, words: str) -> None:
    stream = body.pop("stream", False)
    r = await http.post(route, json={"inputs": "hi", "stream": stream,
                                     "parameters": {"max_new_tokens": 2, **body}})
    assert r.status_code == 422, r.text
    assert r.json() == {"error": words, "error_type": "validation"}


async def test_tgi_best_of(http: httpx.AsyncClient) -> None:
    params = {"max_new_tokens": 6, "do_sample": True, "best_of": 3, "details": True,
              "return_full_text": True}
    r = await http.post("/generate", json={"inputs": PROMPT, "parameters": params})
    assert r.status_code == 200, r.text
    body = r.json()
    d = body["details"]
    others = d["best_of_sequences"]
    assert len(others) == 2
    assert all(set(s) == {"generated_text", "finish_reason", "generated_tokens", "seed",
                          "prefill", "tokens"} for s in others)
    best_score = mean([t["logprob"] for t in d["tokens"]])
    assert all(best_score >= mean([t["logprob"] for t in s["tokens"]]) for s in others)
    # Each sequence's own seed: the request's random one + its index.
    seeds = sorted([d["seed"], *(s["seed"] for s in others)])
    assert seeds == [seeds[0], seeds[0] + 1, seeds[0] + 2]
    for seq in [{**d, "generated_text": body["generated_text"]}, *others]:
        assert seq["generated_text"] == PROMPT + "".join(t["text"] for t in seq["tokens"])
        assert seq["generated_tokens"] == len(seq["tokens"])
    # The sequence with the lowest seed, asked alone with that seed, is the same text.
    lowest = next(s for s in [{**d, "generated_text": body["generated_text"]}, *others]
                  if s["seed"] == seeds[0])
    alone = await http.post("/generate", json={"inputs": PROMPT, "parameters": {
        "max_new_tokens": 6, "do_sample": True, "seed": seeds[0], "return_full_text": True}})
    assert alone.json()["generated_text"] == lowest["generated_text"]

    plain = await http.post("/generate", json={"inputs": PROMPT, "parameters": {
        "max_new_tokens": 3, "temperature": 0.8, "best_of": 2}})
    assert list(plain.json()) == ["generated_text"]
    info = (await http.get("/info")).json()
    assert info["max_best_of"] == 16


class RefusesOneChoice:
    """The engine, except that choice 2 of every request is refused as bad input."""

    def __init__(self, engine) -> None:
        self.engine, self.closed = engine, []

    async def generate(self, prompt_ids, params, request_id):
        if request_id.endswith("-2"):
            raise ValueError("choice 2 refused")
        try:
            async for out in self.engine.generate(prompt_ids, params, request_id):
                yield out
        finally:
            self.closed.append(request_id)


async def test_a_refused_choice_ends_them_all(llm: LLM) -> None:
    async with serving_engine(llm) as engine:
        client = RefusesOneChoice(engine)
        async with client_for(build_api(client, llm.tokenizer, "tiny", 2048)) as http:
            r = await http.post("/v1/completions", json={"prompt": PROMPT, "n": 3,
                                                          "max_tokens": 500, "ignore_eos": True})
            assert r.status_code == 400 and r.json()["error"]["message"] == "choice 2 refused"
            # the two that started were closed (which aborts them), not left to run 500 steps
            rid = min(client.closed, key=len)
            assert sorted(client.closed) == [rid, f"{rid}-1"]
            await engine.check_integrity()
    assert llm.engine.num_pages_used == 0


async def test_official_client(llm: LLM) -> None:
    from openai import AsyncOpenAI

    async with serving_engine(llm) as engine, client_for(
            build_api(engine, llm.tokenizer, "tiny", 2048)) as http:
        client = AsyncOpenAI(base_url="http://test/v1", api_key="none", http_client=http)
        done = await client.completions.create(model="tiny", prompt=PROMPT, n=2, best_of=3,
                                               seed=1, max_tokens=4, temperature=1.0)
        assert [c.index for c in done.choices] == [0, 1]
        chat = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hi"}], n=3, max_tokens=4,
            temperature=0)
        assert [c.index for c in chat.choices] == [0, 1, 2]
        assert len({c.message.content for c in chat.choices}) == 1

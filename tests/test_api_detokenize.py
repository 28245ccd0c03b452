"""Text on the API side: an engine built with `detokenize=False` (as every serving replica is)
behind build_api answers every route with the text of the engine-side detokenizer: stop strings,
multi-byte characters, logprobs, usage. A stop string found in the API ends the request
upstream (its pages come back) although the engine alone would have run on to max_tokens."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest

from api.server import build_api
from engine.async_engine import AsyncEngine
from engine.llm import LLM
from engine.llm_engine import Engine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

pytestmark = pytest.mark.anyio
PROMPT = "Once upon a time, the lighthouse keeper"
MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def raw(llm: LLM) -> Engine:
    """The tiny model in an engine that streams token ids only, as the serving replicas do."""
    return Engine(llm.engine.model_cfg, llm.engine.cfg, detokenize=False)


async def wait_idle(engine: Engine) -> None:
    """Until the engine holds no request (the deadline is a hang guard only); then no page."""
    deadline = asyncio.get_running_loop().time() + 60
    while engine.has_unfinished():
        assert asyncio.get_running_loop().time() < deadline, "a request never ended"
        await asyncio.sleep(0.01)
    engine.check_integrity()
    assert engine.num_pages_used == 0


@asynccontextmanager
async def api_over(engine: Engine, llm: LLM, wrap=lambda c: c
                   ) -> AsyncIterator[httpx.AsyncClient]:
    """build_api over `wrap(AsyncEngine(engine))`; on exit, the engine is back to no page."""
    aengine = AsyncEngine(engine)
    app = build_api(wrap(aengine), llm.tokenizer, MODEL, engine.max_model_len)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://test") as http:
        yield http
    await wait_idle(engine)
    aengine.close()


def texts(llm: LLM) -> tuple[str, str]:
    """A greedy and a seeded high-temperature output; the latter has multi-byte characters."""
    greedy = llm.generate(PROMPT, SamplingParams(max_tokens=24, temperature=0.0,
                                                 ignore_eos=True))[0].text
    seeded = llm.generate(PROMPT, SamplingParams(**SEEDED))[0].text
    assert any(ord(c) > 127 for c in seeded)  # the case this module is about
    return greedy, seeded


SEEDED = dict(max_tokens=40, temperature=1.5, top_k=0, seed=5, ignore_eos=True)


def bodies(llm: LLM) -> list[tuple[str, dict]]:
    greedy, seeded = texts(llm)
    wide = next(i for i, c in enumerate(seeded) if ord(c) > 127)
    sampled = {k: v for k, v in SEEDED.items() if k != "max_tokens"}
    common = {"prompt": PROMPT, "ignore_eos": True, "logprobs": 2}
    tgi = {"max_new_tokens": 24, "details": True, "top_n_tokens": 2}
    return [
        ("/v1/completions", {**common, "max_tokens": 24, "temperature": 0}),
        ("/v1/completions", {**common, "max_tokens": 24, "temperature": 0,
                             "stop": [greedy[6:10]]}),
        ("/v1/completions", {**common, "max_tokens": 40, **sampled}),
        ("/v1/completions", {**common, "max_tokens": 40, **sampled,
                             "stop": [seeded[wide:wide + 2], "zzzz"]}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPT}],
                                  "max_tokens": 24, "temperature": 0, "logprobs": True,
                                  "top_logprobs": 2, "stop": [greedy[3:5]]}),
        ("/generate", {"inputs": PROMPT, "parameters": {**tgi, "stop": [greedy[6:10]]}}),
        ("/generate", {"inputs": PROMPT, "parameters": {
            **tgi, "max_new_tokens": 40, "temperature": 1.5, "seed": 5,
            "stop": [seeded[wide:wide + 2]]}}),
    ]


def sse(text: str) -> list[dict]:
    raw = [e.removeprefix("data:").strip() for e in text.split("\n\n") if e]
    return [json.loads(e) for e in raw if e != "[DONE]"]


def summary(path: str, r: httpx.Response, stream: bool) -> dict:
    """What a client gets, independent of how tokens were grouped into outputs (that depends
    on timing): text, finish reason, token ids, logprobs, usage."""
    assert r.status_code == 200, r.text
    if not stream:
        body = r.json()
        if path == "/generate":
            d = body["details"]
            assert "".join(t["text"] for t in d["tokens"]) == body["generated_text"]
            return {"text": body["generated_text"], "reason": d["finish_reason"],
                    "ids": [t["id"] for t in d["tokens"]],
                    "lps": [t["logprob"] for t in d["tokens"]], "top": d["top_tokens"]}
        [c] = body["choices"]
        lp = dict(c["logprobs"] or {})
        lp.pop("text_offset", None)
        return {"text": c.get("text") or c["message"]["content"], "reason": c["finish_reason"],
                "lps": lp, "usage": body["usage"]}
    events = sse(r.text)
    if path == "/generate_stream":
        return {"text": events[-1]["generated_text"],
                "reason": events[-1]["details"]["finish_reason"],
                "ids": [e["token"]["id"] for e in events],
                "lps": [e["token"]["logprob"] for e in events]}
    choices = [c for e in events for c in e["choices"]]
    text = "".join(c.get("text") or c.get("delta", {}).get("content", "") for c in choices)
    return {"text": text, "reason": choices[-1]["finish_reason"], "usage": events[-1]["usage"]}


async def test_engine_without_detokenize_sends_token_ids_only(llm: LLM, raw: Engine) -> None:
    greedy, _ = texts(llm)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True,
                            stop=[greedy[6:10]])
    raw.add_request(PROMPT, params, "r")
    outs: list[RequestOutput] = []
    while raw.has_unfinished():
        outs += raw.step()
    assert all(o.new_text == "" for o in outs) and not raw.detokenizers
    # Stop strings are not its business: it runs to max_tokens; the engine-side one stops.
    assert outs[-1].finish_reason == "length" and len(outs) == 24
    assert llm.generate(PROMPT, params)[0].finish_reason == "stop"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_routes_give_the_same_text_either_way(llm: LLM, raw: Engine, stream: bool) -> None:
    got: dict[str, list[dict]] = {}
    for name, engine in [("engine", llm.engine), ("api", raw)]:
        got[name] = []
        async with api_over(engine, llm) as http:
            for path, body in bodies(llm):
                if stream and path == "/generate":
                    path = "/generate_stream"
                elif stream:
                    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
                r = await http.post(path, json=body)
                got[name].append(summary(path, r, stream))
    assert got["api"] == got["engine"]
    reasons = [s["reason"] for s in got["api"]]
    assert reasons.count("stop") >= 2 and reasons.count("stop_sequence") == 2, reasons
    assert any(ord(c) > 127 for s in got["api"] for c in s["text"])


async def test_text_equals_the_offline_engine(llm: LLM, raw: Engine) -> None:
    """Independent of the API's own detokenizer: the text `LLM.generate` makes in the engine."""
    greedy, seeded = texts(llm)
    wide = next(i for i, c in enumerate(seeded) if ord(c) > 127)
    async with api_over(raw, llm) as http:
        for kw, stop in [({"max_tokens": 24, "temperature": 0.0, "ignore_eos": True},
                          greedy[6:10]), (SEEDED, seeded[wide:wide + 2]), (SEEDED, None)]:
            ref = llm.generate(PROMPT, SamplingParams(**kw, stop=[stop] if stop else [],
                                                      logprobs=0))[0]
            body = {"prompt": PROMPT, **kw, "stop": stop, "logprobs": 0}
            c = (await http.post("/v1/completions", json=body)).json()
            assert c["choices"][0]["text"] == ref.text
            assert c["choices"][0]["finish_reason"] == ref.finish_reason
            assert c["usage"]["completion_tokens"] == len(ref.token_ids)
            assert c["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(
                [x.logprob for x in ref.logprobs], abs=1e-5)


class Spy:
    """A GenerateClient over an AsyncEngine that records how each upstream stream ended."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine, self.ends = engine, []

    async def generate(self, prompt_ids, params, request_id) -> AsyncIterator[RequestOutput]:
        end = "closed early"
        try:
            async for out in self.engine.generate(prompt_ids, params, request_id):
                if out.finished:
                    end = f"finished: {out.finish_reason}"
                yield out
        finally:
            self.ends.append(end)


async def test_stop_string_in_the_api_aborts_the_request_upstream(
        llm: LLM, raw: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    greedy, _ = texts(llm)
    stop = greedy[6:10]
    ref = llm.generate(PROMPT, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True,
                                              stop=[stop]))[0]
    aborted: list[bool] = []  # per abort call: was the request still in the engine?
    engine_abort = raw.abort
    monkeypatch.setattr(raw, "abort", lambda rid: aborted.append(engine_abort(rid)) or True)
    spies: list[Spy] = []
    async with api_over(raw, llm, lambda c: spies.append(Spy(c)) or spies[0]) as http:
        for stream in (False, True):
            r = await http.post("/v1/completions", json={
                "prompt": PROMPT, "max_tokens": 1500, "temperature": 0, "ignore_eos": True,
                "stop": [stop], "stream": stream,
                **({"stream_options": {"include_usage": True}} if stream else {})})
            got = summary("/v1/completions", r, stream)
            assert got["text"] == ref.text and got["reason"] == "stop"
            assert got["usage"]["completion_tokens"] == len(ref.token_ids)
            await wait_idle(raw)  # no page left
    # The engine never finished these requests: the API closed their streams when it found
    # the stop string, and that aborted them while they were still running.
    assert spies[0].ends == ["closed early", "closed early"]
    assert aborted == [True, True]

"""Fuzzing the HTTP API with hypothesis, in process over a real engine: whatever the body, no
answer is a 5xx (nor a 200 stream carrying a server error), every error has its route family's
shape, and afterwards the engine holds no KV page.

Bodies mix plausible values with arbitrary JSON (NaN, huge integers, lone surrogates, nesting)
for every field of the OpenAI and TGI requests (chat messages of every role, with and without
content, as strings or text parts; booleans where numbers go and numbers where booleans go;
`n` and `best_of` in and out of range), plus raw bytes and valid bodies made invalid UTF-8
(always bad input: 400 on /v1, 422 on TGI routes). An accepted request has n choices per prompt,
numbered in order (TGI: best_of - 1 other sequences). Token limits are kept small so that
accepted requests finish quickly. PDSERVE_FUZZ_EXAMPLES sets the number of examples;
PDSERVE_FUZZ_RANDOM=1 draws new ones each run (the default run is the same every time).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api.server import build_api
from engine.async_engine import AsyncEngine
from engine.llm import LLM
from engine.tiny_model import ensure_tiny_model
from serving.limits import Limits

EXAMPLES = int(os.environ.get("PDSERVE_FUZZ_EXAMPLES", "150"))
RANDOM = bool(os.environ.get("PDSERVE_FUZZ_RANDOM"))
STATUSES: Counter = Counter()
LIMITS = Limits(max_total_tokens=48, max_input_tokens=40, max_body_bytes=20_000)

scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
anything = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=8)
small_int = st.integers(-3, 40)
unit = st.floats(-0.5, 2.5)
text = st.text(max_size=30)
token_ids = st.lists(st.integers(-5, 2100), max_size=30)


def some(*options: st.SearchStrategy) -> st.SearchStrategy:
    """A plausible value most of the time, arbitrary JSON otherwise."""
    return st.one_of(*options, anything)


# Valid bodies: most fields set to values the API accepts.
prompt_text = st.text(min_size=1, max_size=30)
ROLES = ["system", "developer", "user", "assistant"]
content = st.one_of(prompt_text, st.lists(st.fixed_dictionaries(
    {"type": st.just("text"), "text": st.text(max_size=10)}), max_size=2))
good_ids = st.lists(st.integers(0, 1999), min_size=1, max_size=30)
good_common = {
    "max_tokens": st.integers(1, 8), "temperature": st.floats(0, 2), "seed": st.integers(0, 9),
    "top_p": st.floats(0.05, 1), "top_k": st.integers(-1, 50), "stream": st.booleans(),
    "stop": st.lists(st.text(min_size=1, max_size=3), max_size=2), "ignore_eos": st.booleans(),
    "repetition_penalty": st.floats(0.5, 2), "model": st.just("tiny"), "n": st.integers(1, 3)}
good = {
    "/v1/completions": st.fixed_dictionaries(
        {"prompt": st.one_of(prompt_text, good_ids, st.lists(prompt_text, min_size=1,
                                                             max_size=2))},
        optional={**good_common, "logprobs": st.integers(0, 3), "best_of": st.integers(1, 4)}),
    "/v1/chat/completions": st.fixed_dictionaries(
        {"messages": st.lists(st.one_of(
            st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": content}),
            st.fixed_dictionaries({"role": st.just("assistant")},
                                  optional={"content": st.none()})),
            min_size=1, max_size=3)},
        optional={**good_common, "logprobs": st.booleans()}),
}
good_tgi = st.fixed_dictionaries({"inputs": prompt_text, "parameters": st.fixed_dictionaries(
    {"max_new_tokens": st.integers(1, 8)},
    optional={"temperature": st.floats(0.1, 2), "top_k": st.integers(1, 50),
              "top_p": st.floats(0.05, 0.95), "do_sample": st.booleans(),
              "details": st.booleans(), "seed": st.integers(0, 9), "truncate": st.integers(1, 40),
              "stop": st.lists(st.text(min_size=1, max_size=3), max_size=2),
              "top_n_tokens": st.integers(0, 3), "return_full_text": st.booleans(),
              "best_of": st.integers(1, 3)})},
    optional={"stream": st.booleans()})
good.update({"/generate": good_tgi, "/generate_stream": good_tgi, "/": good_tgi})

# Wild values per field: plausible-but-wrong ones and arbitrary JSON.
wild_common = {
    "model": some(text), "max_tokens": some(small_int), "temperature": some(unit),
    "top_p": some(unit), "top_k": some(small_int), "n": some(st.integers(-1, 18)),
    "stream": anything, "stop": some(text, st.lists(text, max_size=6)),
    "stop_token_ids": some(token_ids), "seed": some(st.integers(-1, 2**64)),
    "ignore_eos": anything, "repetition_penalty": some(unit), "presence_penalty": some(unit),
    "stream_options": some(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "logit_bias": anything, "user": anything,
}
wild = {
    "/v1/completions": {**wild_common, "logprobs": some(st.integers(-1, 22)), "echo": anything,
                        "suffix": anything, "best_of": some(st.integers(-1, 18)),
                        "prompt": some(text, token_ids, st.lists(text, max_size=40),
                                       st.lists(token_ids, max_size=3))},
    "/v1/chat/completions": {**wild_common, "max_completion_tokens": some(small_int),
                             "logprobs": anything, "top_logprobs": some(st.integers(-1, 22)),
                             "tools": anything, "response_format": anything,
                             "messages": some(st.lists(st.fixed_dictionaries({}, optional={
                                 "role": some(st.sampled_from([*ROLES, "tool"]), text),
                                 "content": some(content, st.lists(anything, max_size=2)),
                                 "name": anything}), max_size=3))},
}
wild_tgi = {"inputs": some(text), "stream": anything, "parameters": some(
    st.fixed_dictionaries({}, optional={
        k: some(small_int, unit, st.lists(text, max_size=6)) for k in (
            "max_new_tokens", "temperature", "top_k", "top_p", "do_sample", "stop",
            "truncate", "details", "seed", "repetition_penalty", "return_full_text",
            "top_n_tokens", "best_of", "typical_p", "watermark", "grammar",
            "decoder_input_details", "frequency_penalty")}))}
wild.update({"/generate": wild_tgi, "/generate_stream": wild_tgi, "/": wild_tgi})


def body_strategy(route: str) -> st.SearchStrategy:
    """A valid body with up to two fields replaced by wild values; or wild through and
    through; or raw bytes."""
    fields = sorted(wild[route])
    mutated = st.tuples(good[route], st.lists(st.sampled_from(fields), max_size=2, unique=True)
                        ).flatmap(lambda bk: st.fixed_dictionaries(
                            {k: wild[route][k] for k in bk[1]}).map(lambda m, b=bk[0]: {**b, **m}))
    return st.one_of(mutated, mutated, st.fixed_dictionaries({}, optional=wild[route]),
                     anything, st.binary(max_size=40), st.builds(NotUTF8, good[route],
                                                                 st.integers(0, 10**6)))


class NotUTF8(bytes):
    """A valid body made invalid UTF-8: a byte that never occurs in UTF-8 (0xff) put inside
    its JSON text, so only the decoding fails."""

    def __new__(cls, body: dict, at: int) -> NotUTF8:
        raw = json.dumps(body).encode()
        i = 1 + at % (len(raw) - 1)
        return super().__new__(cls, raw[:i] + b"\xff" + raw[i:])


body_for_route = st.sampled_from(sorted(good)).flatmap(
    lambda route: st.tuples(st.just(route), body_strategy(route)))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    llm = LLM(ensure_tiny_model(tmp_path_factory.getbasetemp() / "tiny-llama"), num_pages=128)
    engine = AsyncEngine(llm.engine)
    app = build_api(engine, llm.tokenizer, "tiny", 2048, limits=LIMITS)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, llm, engine
        # Let anything still queued in the engine loop run before the pages are counted.
        for _ in range(200):
            if not llm.engine.has_unfinished() and not engine.num_open_streams():
                break
            time.sleep(0.01)


def check_error_shape(route: str, status: int, body: dict) -> None:
    if route.startswith("/v1/"):
        assert list(body) == ["error"] and set(body["error"]) == {"message", "type", "param",
                                                                  "code"}
    else:
        assert set(body) == {"error", "error_type"}
        assert body["error_type"] == ("overloaded" if status == 429 else "validation")


@settings(max_examples=EXAMPLES, deadline=None, derandomize=not RANDOM, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(body_for_route)
def test_no_5xx(served, route_body) -> None:
    client, _, _ = served
    route, body = route_body
    # json.dumps writes NaN / Infinity and escapes lone surrogates: both reach the server.
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = client.post(route, content=content, headers={"content-type": "application/json"})
    STATUSES[r.status_code] += 1
    assert r.status_code < 500, (route, body, r.text)
    if isinstance(body, NotUTF8):
        assert r.status_code == (400 if route.startswith("/v1/") else 422), r.text
    if r.status_code >= 400:
        assert r.status_code in (400, 404, 413, 422, 429), r.status_code
        check_error_shape(route, r.status_code, r.json())
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert "server_error" not in r.text and '"error_type":"generation"' not in r.text
    else:
        check_choices(route, body, r.json())


def check_choices(route: str, body: dict, answer: dict | list) -> None:
    """An accepted request gets n choices per prompt, numbered in order; TGI's best_of its
    other sequences in the details."""
    if route.startswith("/v1/"):
        n = body.get("n") or 1
        prompt = body.get("prompt")
        prompts = len(prompt) if isinstance(prompt, list) and isinstance(prompt[0], str | list) \
            else 1
        assert [c["index"] for c in answer["choices"]] == list(range(prompts * n)), answer
        return
    answer = answer[0] if isinstance(answer, list) else answer
    best_of = (body.get("parameters") or {}).get("best_of") or 1
    if "details" in answer:
        assert len(answer["details"].get("best_of_sequences", [])) == best_of - 1


def test_pages_back_to_zero_after_fuzzing(served) -> None:
    _, llm, engine = served
    for _ in range(300):
        if not llm.engine.has_unfinished() and not engine.num_open_streams():
            break
        time.sleep(0.01)
    llm.engine.allocator.check_integrity()
    assert llm.engine.num_pages_used == 0
    print(f"\nfuzz: {sum(STATUSES.values())} requests, statuses {dict(sorted(STATUSES.items()))}")
    assert STATUSES[200] >= sum(STATUSES.values()) // 20  # enough of them reach the engine

"""The schema accepts a body exactly when the server does, for what Schemathesis found
(`schemathesis run .../openapi.json --checks all` against `serve run configs/tiny.yaml`,
docs/api-compat.md), without Schemathesis: each body is judged by the published schema
(jsonschema, draft 2020-12) and by the server, and both must agree. Also: stream events match
the event schema declared for them, the model id is given as the example of
/v1/models/{model_id}, and the n/best_of rule sits in a component of its own.

Small token limits (48 in all) keep the bodies at the output bounds quick to run."""

from __future__ import annotations

import json

import httpx
import pytest

from api.server import build_api
from engine.llm import LLM
from serving.limits import Limits
from tests.api_harness import client_for, serving_engine

pytestmark = pytest.mark.anyio
jsonschema = pytest.importorskip("jsonschema")
TOTAL = 48
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture
async def app(llm: LLM):
    async with serving_engine(llm) as engine:
        yield build_api(engine, llm.tokenizer, "tiny", 2048,
                        limits=Limits(max_total_tokens=TOTAL, max_input_tokens=40))


@pytest.fixture
async def http(app):
    async with client_for(app, timeout=30) as c:
        yield c


def schema_says(app, path: str, body: dict) -> bool:
    schema = app.openapi()
    op = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]
    validator = jsonschema.Draft202012Validator({**op["schema"], "components": schema[
        "components"]})
    return validator.is_valid(body)


async def agree(app, http: httpx.AsyncClient, path: str, body: dict) -> bool:
    """Asserts the schema and the server agree on `body`; returns whether it is valid."""
    r = await http.post(path, json=body)
    assert r.status_code in (200, 400, 422), r.text
    valid = schema_says(app, path, body)
    assert valid == (r.status_code == 200), (path, body, r.status_code, r.text)
    return valid


def shortest_chat_room(app) -> int:
    comps = app.openapi()["components"]["schemas"]
    [alt, _] = comps["ChatCompletionRequest"]["properties"]["max_tokens"]["anyOf"]
    return alt["maximum"]


async def test_what_schemathesis_found(app, http: httpx.AsyncClient, llm: LLM) -> None:
    vocab = len(llm.tokenizer)
    room = shortest_chat_room(app)
    assert 1 < room < TOTAL - 1  # the chat template's tokens are taken off
    system = [{"role": "system", "content": ""}]
    cases = [
        # integers sent as integral floats are integers (JSON Schema's `integer`)
        ("/v1/completions", {"prompt": "hi", "max_tokens": 2.0}, True),
        ("/tokenize", {"inputs": "x", "parameters": {"max_new_tokens": 1.0}}, True),
        ("/generate", {"inputs": "x", "parameters": {"max_new_tokens": 2.0, "top_k": 3.0}},
         True),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 2.5}, False),
        # TGI stop strings must be non-empty, as the engine requires
        ("/", {"inputs": "0", "parameters": {"stop": ["", ""], "max_new_tokens": 1}}, False),
        ("/generate", {"inputs": "0", "parameters": {"stop": ["x"], "max_new_tokens": 1}}, True),
        # /tokenize reads `inputs` and `truncate` only, as TGI's does: other parameters pass
        ("/tokenize", {"inputs": "0", "parameters": {"stop": [""], "top_p": 1.0}}, True),
        ("/tokenize", {"inputs": "0", "parameters": {"truncate": 1}}, True),
        ("/tokenize", {"inputs": "0", "parameters": {"truncate": 0}}, False),
        ("/tokenize", {"inputs": "0", "parameters": "x"}, False),
        # TGI truncate: at most max_input_tokens
        ("/generate", {"inputs": "x", "parameters": {"truncate": 4294967295}}, False),
        ("/generate", {"inputs": "x", "parameters": {"truncate": 40, "max_new_tokens": 1}},
         True),
        ("/generate", {"inputs": "x", "parameters": {"truncate": 41}}, False),
        # the engine's ranges of temperature and repetition_penalty
        ("/generate", {"inputs": "x", "parameters": {"temperature": 1e308}}, False),
        ("/generate_stream", {"inputs": "x", "parameters": {"repetition_penalty": 1.2e308}},
         False),
        ("/generate", {"inputs": "x", "parameters": {"temperature": 100, "max_new_tokens": 1}},
         True),
        ("/v1/completions", {"prompt": "hi", "temperature": 100.5}, False),
        ("/v1/completions", {"prompt": "hi", "repetition_penalty": 10, "max_tokens": 1}, True),
        ("/v1/completions", {"prompt": "hi", "repetition_penalty": 10.5}, False),
        # top_logprobs only with logprobs=true; only the text response format
        ("/v1/chat/completions", {"messages": USER, "logprobs": False, "top_logprobs": 0},
         False),
        ("/v1/chat/completions", {"messages": USER, "logprobs": True, "top_logprobs": 0,
                                  "max_tokens": 1}, True),
        ("/v1/chat/completions", {"messages": USER, "response_format": {"type": "json_object"}},
         False),
        ("/v1/chat/completions", {"messages": USER, "response_format": {"type": "text"},
                                  "max_tokens": 1}, True),
        # stream_options only with stream=true
        ("/v1/completions", {"prompt": "hi", "stream": False, "stream_options": {}}, False),
        ("/v1/chat/completions", {"messages": USER, "stream_options": None, "max_tokens": 1},
         True),
        # output room: the total less the shortest prompt (one id; the chat template)
        ("/v1/completions", {"prompt": [5], "max_tokens": TOTAL - 1}, True),
        ("/v1/completions", {"prompt": [5], "max_tokens": TOTAL}, False),
        ("/generate", {"inputs": "x", "parameters": {"truncate": 1,
                                                     "max_new_tokens": TOTAL - 1}}, True),
        ("/generate", {"inputs": "x", "parameters": {"max_new_tokens": TOTAL}}, False),
        ("/v1/chat/completions", {"messages": system, "max_tokens": room}, True),
        ("/v1/chat/completions", {"messages": system, "max_tokens": room + 1}, False),
        # ... for max_tokens too when max_completion_tokens is the one used
        ("/v1/chat/completions", {"messages": system, "max_completion_tokens": 1,
                                  "max_tokens": room + 1}, False),
        # token ids inside the vocabulary; a batch of at most max_client_batch_size prompts
        ("/v1/completions", {"prompt": [vocab - 1], "max_tokens": 1}, True),
        ("/v1/completions", {"prompt": [vocab]}, False),
        ("/v1/completions", {"prompt": "hi", "stop_token_ids": [vocab]}, False),
        ("/v1/completions", {"prompt": [[1]] * 33}, False),
        ("/v1/completions", {"prompt": [5] * 41}, False),  # more ids than max_input_tokens
    ]
    for path, body, valid in cases:
        assert await agree(app, http, path, body) == valid, (path, body)


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "hi", "max_tokens": 3, "stream": True, "logprobs": 1,
                         "stream_options": {"include_usage": True}}),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 3, "stream": True, "n": 2}),
    ("/generate_stream", {"inputs": "hi", "parameters": {"max_new_tokens": 3}}),
    ("/", {"inputs": "hi", "stream": True, "parameters": {"max_new_tokens": 3}}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 3, "stream": True, "echo": True,
                         "logprobs": 1}),  # the prompt's chunk first
])
async def test_stream_events_match_their_schema(app, http: httpx.AsyncClient, path: str,
                                                body: dict) -> None:
    """Each SSE event as the format defines it ({data, event, id, retry}) against the schema
    declared under text/event-stream, and its data against the declared `contentSchema`."""
    declared = app.openapi()["paths"][path]["post"]["responses"]["200"]["content"]
    event_schema = declared["text/event-stream"]["schema"]
    r = await http.post(path, json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert len(events) >= 3
    for raw in events:
        field, _, value = raw.partition(":")
        assert field == "data"
        event = {"data": value.removeprefix(" "), "event": "message"}
        jsonschema.validate(event, event_schema)
        data = event_schema["properties"]["data"]
        alternatives = data.get("anyOf", [data])
        if event["data"] == "[DONE]":
            assert {"const": "[DONE]"} in alternatives
            continue
        [content] = [a for a in alternatives if "contentSchema" in a]
        assert content["contentMediaType"] == "application/json"
        jsonschema.validate(json.loads(event["data"]), content["contentSchema"])


async def test_model_id_example_and_choice_rules(app, http: httpx.AsyncClient) -> None:
    schema = app.openapi()
    [param] = schema["paths"]["/v1/models/{model_id}"]["get"]["parameters"]
    assert param["example"] == "tiny"
    assert (await http.get(f"/v1/models/{param['example']}")).status_code == 200
    # Inlined, the rule's 32 cases times every property of the request outgrew what
    # Schemathesis expands ("does not support this part of it"): it is referred to instead.
    comps = schema["components"]["schemas"]
    assert {"$ref": "#/components/schemas/CompletionChoiceRules"} in comps[
        "CompletionRequest"]["allOf"]
    assert len(comps["CompletionChoiceRules"]["anyOf"]) == 32

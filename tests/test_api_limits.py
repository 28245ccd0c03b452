"""Admission limits and the request-level checks around them, in process over a real engine:
overload at 4x the concurrency limit gets 429s with Retry-After at once (before any admitted
request has finished) while the admitted requests complete; the prefill-token queue times out
into a 429; bodies past the limit get a 413; token limits state both numbers; X-Request-Id is
echoed; /health follows ready(); two apps over one admission ledger (two ingress replicas)
share the concurrency limit, and admit a local share of it while the ledger is away."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from api.server import build_api
from engine.llm import LLM
from engine.outputs import RequestOutput
from serving.admission_ledger import LocalLedger, SharedSlots
from serving.limits import Limits
from tests.api_harness import client_for as harness_client
from tests.api_harness import serving_engine

pytestmark = pytest.mark.anyio
LIMIT = 4


def client_for(app) -> httpx.AsyncClient:
    return harness_client(app, timeout=60)


@pytest.fixture
async def engine(llm: LLM):
    async with serving_engine(llm) as engine:
        yield engine
    llm.engine.allocator.check_integrity()


async def test_overload_at_4x_gets_fast_429_and_admitted_complete(llm: LLM, engine) -> None:
    limits = Limits(max_concurrent_requests=LIMIT)
    app = build_api(engine, llm.tokenizer, "tiny", 2048, limits=limits)
    n_tokens = 48
    answered: list[int] = []  # status codes, in the order the responses came back

    async def one(http: httpx.AsyncClient, i: int) -> tuple[int, float, httpx.Response]:
        if i % 2:
            path, body = "/generate", {"inputs": f"Request {i} says", "parameters": {
                "max_new_tokens": n_tokens, "details": True}}
        else:
            path, body = "/v1/completions", {"prompt": f"Request {i} says", "temperature": 0,
                                             "max_tokens": n_tokens, "ignore_eos": True}
        start = time.perf_counter()
        r = await http.post(path, json=body)
        answered.append(r.status_code)
        return i, time.perf_counter() - start, r

    async with client_for(app) as http:
        results = await asyncio.gather(*(one(http, i) for i in range(4 * LIMIT)))
    rejected = [(i, dt, r) for i, dt, r in results if r.status_code == 429]
    admitted = [(i, dt, r) for i, dt, r in results if r.status_code == 200]
    assert len(rejected) + len(admitted) == 4 * LIMIT
    assert len(rejected) >= 2 * LIMIT and len(admitted) >= LIMIT
    print(f"\noverload: {len(admitted)} admitted, {len(rejected)} x 429, slowest 429 in "
          f"{max(dt for _, dt, _ in rejected) * 1000:.1f} ms")
    # Fast means refused at the door, not queued for a slot: every 429 is out before the
    # first admitted request (48 engine steps) has finished.
    assert answered[:len(rejected)] == [429] * len(rejected), answered
    for i, _, r in rejected:
        assert r.headers["retry-after"] == "1"
        if i % 2:
            assert r.json()["error_type"] == "overloaded"
        else:
            assert r.json()["error"]["type"] == "rate_limit_error"
    for i, _, r in admitted:
        body = r.json()
        if i % 2:
            assert body["details"]["generated_tokens"] <= n_tokens
        else:
            assert body["usage"]["completion_tokens"] == n_tokens
    assert app.state.admission.active == 0


class SlowClient:
    """First output after `delay` seconds, and not before `gate` is set (if given); records the
    prompts it saw."""

    def __init__(self, delay: float, gate: asyncio.Event | None = None) -> None:
        self.delay, self.gate, self.seen = delay, gate, []

    async def generate(self, prompt_ids, params, request_id) -> AsyncIterator[RequestOutput]:
        self.seen.append(len(prompt_ids))
        if self.gate is not None:
            await self.gate.wait()
        await asyncio.sleep(self.delay)
        yield RequestOutput(request_id, [42], "ok", True, "length", num_output_tokens=1)


async def test_prefill_token_queue_times_out_into_429(llm: LLM) -> None:
    gate = asyncio.Event()  # holds the first request in prefill until the test sets it
    fake = SlowClient(0, gate)
    limits = Limits(max_batch_prefill_tokens=200, max_input_tokens=200, queue_timeout_s=0.05)
    app = build_api(fake, llm.tokenizer, "tiny", 2048, limits=limits)
    body = {"prompt": [7] * 150, "max_tokens": 1}
    async with client_for(app) as http:
        first = asyncio.create_task(http.post("/v1/completions", json=body))
        while not app.state.admission.prefilling:  # the first one is in prefill
            await asyncio.sleep(0.001)
        start = time.perf_counter()
        r = await http.post("/v1/completions", json=body)  # 150 + 150 > 200: queued
        waited = time.perf_counter() - start
        # A 429 once the queue timeout is up, while the first one still holds the room.
        assert r.status_code == 429 and waited >= limits.queue_timeout_s
        assert r.headers["retry-after"] == "1"
        err = r.json()["error"]
        assert err["type"] == "rate_limit_error" and "prefill capacity" in err["message"]
        assert not first.done() and app.state.admission.prefilling == 150
        assert fake.seen == [150]  # the refused one never reached the client
        gate.set()
        assert (await first).status_code == 200
        # Room again once the first one's first token is out.
        assert (await http.post("/v1/completions", json=body)).status_code == 200
    assert fake.seen == [150, 150]
    assert app.state.admission.prefilling == 0 and app.state.admission.active == 0


async def test_queued_request_runs_when_prefill_room_frees(llm: LLM) -> None:
    fake = SlowClient(0.1)
    # The queue timeout is a hang guard only: each queued request must run once room frees.
    limits = Limits(max_batch_prefill_tokens=200, max_input_tokens=200, queue_timeout_s=60)
    app = build_api(fake, llm.tokenizer, "tiny", 2048, limits=limits)
    body = {"prompt": [7] * 150, "max_tokens": 1}
    async with client_for(app) as http:
        rs = await asyncio.gather(*(http.post("/v1/completions", json=body) for _ in range(3)))
    assert [r.status_code for r in rs] == [200] * 3


async def test_body_limit_413_in_both_shapes(llm: LLM, engine) -> None:
    app = build_api(engine, llm.tokenizer, "tiny", 2048, limits=Limits(max_body_bytes=1000))
    big = json.dumps({"prompt": "x" * 2000, "inputs": "x" * 2000}).encode()

    async def chunked():
        for i in range(0, len(big), 100):
            yield big[i:i + 100]

    async with client_for(app) as http:
        for content in (big, chunked()):
            r = await http.post("/v1/completions", content=content)
            assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
        r = await http.post("/generate", content=big)
        assert r.status_code == 413 and r.json()["error_type"] == "validation"
        assert (await http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2,
                                                         "temperature": 0})).status_code == 200


async def test_token_limits_stop_count_and_ids(llm: LLM, engine) -> None:
    limits = Limits(max_input_tokens=50, max_total_tokens=60, max_stop_sequences=2,
                    max_client_batch_size=3)
    app = build_api(engine, llm.tokenizer, "tiny", 2048, limits=limits)
    async with client_for(app) as http:
        err = (await http.post("/v1/completions", json={"prompt": [5] * 51})).json()["error"]
        assert "51 tokens" in err["message"] and "at most 50" in err["message"]
        err = (await http.post("/v1/completions", json={"prompt": [5] * 50, "max_tokens": 11})
               ).json()["error"]
        assert "60 tokens, but 61 were requested" in err["message"]
        r = await http.post("/generate", json={"inputs": "hi " * 80,
                                               "parameters": {"max_new_tokens": 5}})
        assert r.status_code == 422 and "at most 50" in r.json()["error"]
        # TGI's truncate keeps the last 40 tokens instead.
        r = await http.post("/generate", json={"inputs": "hi " * 80, "parameters": {
            "max_new_tokens": 5, "truncate": 40, "details": True}})
        assert r.status_code == 200 and r.json()["details"]["generated_tokens"] <= 5
        info = (await http.get("/info")).json()
        assert (info["max_input_tokens"], info["max_total_tokens"]) == (50, 60)
        for path, body in [("/v1/completions", {"prompt": "hi", "stop": ["a", "b", "c"]}),
                           ("/generate", {"inputs": "hi", "parameters": {"stop": ["a"] * 3}})]:
            r = await http.post(path, json=body)
            assert r.status_code in (400, 422) and "at most 2 stop sequences" in r.text
        r = await http.post("/v1/completions", json={"prompt": "hi", "stop_token_ids": [5000]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "stop_token_ids"
        r = await http.post("/v1/completions", json={"prompt": ["a", "b", "c", "d"]})
        assert r.status_code == 400 and "at most 3 prompts" in r.text
        r = await http.post("/v1/completions", content=b'{"prompt": "a\\ud800"}',
                            headers={"content-type": "application/json"})
        assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"]


async def test_request_id_header_and_health(llm: LLM) -> None:
    state = {"ready": True}
    app = build_api(SlowClient(0), llm.tokenizer, "tiny", 2048, ready=lambda: state["ready"])
    async with client_for(app) as http:
        r = await http.post("/v1/completions", json={"prompt": "hi"},
                            headers={"X-Request-Id": "client-7"})
        assert r.headers["x-request-id"] == "client-7"
        generated = (await http.get("/v1/models")).headers["x-request-id"]
        bad = (await http.get("/v1/models", headers={"X-Request-Id": "no spaces"})
               ).headers["x-request-id"]
        assert len(generated) == 32 and bad != "no spaces"
        assert (await http.get("/health")).status_code == 200
        state["ready"] = False
        r = await http.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "unavailable"


async def test_two_replicas_share_the_concurrency_limit(llm: LLM) -> None:
    """Two apps over one ledger (two ingress replicas): the limit holds for both together,
    429 + Retry-After through either one; a slot freed on one is taken through the other."""
    port = LocalLedger()
    gate = asyncio.Event()  # every admitted request waits for it
    fake = SlowClient(0, gate)
    limits = Limits(max_concurrent_requests=LIMIT)
    apps = [build_api(fake, llm.tokenizer, "tiny", 2048, limits=limits,
                      shared_slots=SharedSlots(port, name, LIMIT)) for name in ("a", "b")]
    body = {"prompt": "hi", "max_tokens": 1}
    async with client_for(apps[0]) as a, client_for(apps[1]) as b:
        held = [asyncio.create_task(http.post("/v1/completions", json=body))
                for http in (a, a, a, b)]
        while len(fake.seen) < LIMIT:  # all four admitted and in the client
            await asyncio.sleep(0.001)
        assert port.ledger.counts() == {"a": 3, "b": 1}
        for http, path, req in [(a, "/v1/completions", body), (b, "/v1/completions", body),
                                (b, "/generate", {"inputs": "hi"})]:
            r = await http.post(path, json=req)
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert [app.state.admission.num_rejected for app in apps] == [1, 2]
        gate.set()
        assert [(await t).status_code for t in held] == [200] * LIMIT
        await asyncio.sleep(0)  # the releases' count goes out on the next turn of the loop
        assert port.ledger.counts() == {"a": 0, "b": 0}
        gate.clear()
        more = [asyncio.create_task(b.post("/v1/completions", json=body)) for _ in range(LIMIT)]
        while len(fake.seen) < 2 * LIMIT:  # b alone now takes the whole limit
            await asyncio.sleep(0.001)
        assert (await a.post("/v1/completions", json=body)).status_code == 429
        gate.set()
        assert [(await t).status_code for t in more] == [200] * LIMIT
    assert [app.state.admission.active for app in apps] == [0, 0]


async def test_unreachable_ledger_admits_a_local_share(llm: LLM) -> None:
    """Fail open (serving/admission_ledger.py says why): each replica admits its share of the
    limit, as the ledger last counted the replicas, until the ledger answers again."""
    port = LocalLedger()
    gate = asyncio.Event()
    fake = SlowClient(0, gate)
    limits = Limits(max_concurrent_requests=LIMIT)
    slots = [SharedSlots(port, name, LIMIT) for name in ("a", "b")]
    apps = [build_api(fake, llm.tokenizer, "tiny", 2048, limits=limits, shared_slots=s)
            for s in slots]
    for s in slots:
        await s.renew()  # both known to the ledger: a share is LIMIT // 2
    await slots[0].renew()
    port.down = True
    body = {"prompt": "hi", "max_tokens": 1}
    async with client_for(apps[0]) as a:
        held = [asyncio.create_task(a.post("/v1/completions", json=body))
                for _ in range(LIMIT // 2)]
        while len(fake.seen) < LIMIT // 2:
            await asyncio.sleep(0.001)
        r = await a.post("/v1/completions", json=body)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        gate.set()
        assert [(await t).status_code for t in held] == [200] * (LIMIT // 2)
        text = (await a.get("/metrics")).text  # the fallback is visible to whoever scrapes
        assert re.search(r"^pdserve_api_admission_ledger_up\{[^}]*\} 0$", text, re.M)
        assert re.search(r"^pdserve_api_admission_local_decisions_total\{[^}]*\} "
                         f"{LIMIT // 2 + 1}$", text, re.M)
    assert not slots[0].ledger_up and slots[0].num_fallbacks == LIMIT // 2 + 1
    port.down = False
    await slots[0].renew()
    assert slots[0].ledger_up and port.ledger.counts() == {"a": 0, "b": 0}


async def test_a_slot_is_free_before_the_last_bytes_go_out_and_freed_once() -> None:
    """The gate gives the slot back as the response's final body message is sent, while the
    app may still be closing its streams; an app that fails before answering frees it too."""
    from api.admission import Admission, AdmissionGate

    admission = Admission(Limits(max_concurrent_requests=1))
    seen: list[tuple[str, int]] = []
    cleanup = asyncio.Event()

    async def app(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        seen.append(("after the last send", admission.active))
        await cleanup.wait()  # e.g. closing the generations

    async def send(message: dict) -> None:
        seen.append((message["type"], admission.active))

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "root_path": ""}
    task = asyncio.ensure_future(AdmissionGate(app, admission)(scope, None, send))
    while len(seen) < 4:
        await asyncio.sleep(0)
    assert seen == [("http.response.start", 1), ("http.response.body", 1),
                    ("http.response.body", 0), ("after the last send", 0)]
    cleanup.set()
    await task
    assert admission.active == 0

    async def failing(scope, receive, send) -> None:
        raise RuntimeError("before any answer")

    with pytest.raises(RuntimeError):
        await AdmissionGate(failing, admission)(scope, None, send)
    assert admission.active == 0

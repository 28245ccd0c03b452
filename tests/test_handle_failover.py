"""Decode-replica failover in HandleClient, against stand-in handles over a real engine that
streams token ids only (as the serving replicas do): a stream whose replica dies mid-way
continues on a fresh call with prompt + tokens so far and, with the API's DetokenizingClient in
front as build_api puts it, yields exactly the tokens and text of a clean run (greedy and
seeded sampling; stop strings and multi-byte characters across the failure point); when
replicas keep dying the API ends the stream with an error event; nothing hangs and no page is
left behind."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from ray.exceptions import ActorDiedError

from api.detokenizing_client import DetokenizingClient
from api.handle_client import HandleClient
from api.server import build_api
from engine.async_engine import AsyncEngine
from engine.llm import LLM
from engine.llm_engine import Engine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

pytestmark = pytest.mark.anyio
PROMPT = "Once upon a time, the lighthouse keeper"


class DyingResponse:
    """A streaming DeploymentResponse whose replica dies after `die_after` tokens. The engine
    merges a stream's outputs when its consumer falls behind (as on a loaded machine), so the
    death is counted in tokens, and an output that runs past it arrives cut at the death point:
    the client gets exactly `die_after` tokens however the engine grouped them."""

    def __init__(self, stream, die_after: int | None) -> None:
        self.stream, self.die_after, self.n, self.cancelled = stream, die_after, 0, False

    def __aiter__(self) -> DyingResponse:
        return self

    async def __anext__(self):
        if self.die_after is not None and self.n >= self.die_after:
            await self.stream.aclose()  # the replica's engine goes down with it
            raise ActorDiedError()
        out = await anext(self.stream)
        cut = 0 if self.die_after is None else self.n + len(out.new_token_ids) - self.die_after
        if cut > 0:  # the replica dies before sending the rest of this output
            keep = len(out.new_token_ids) - cut
            out = out.evolve(new_token_ids=out.new_token_ids[:keep],
                             new_logprobs=out.new_logprobs[:keep], finished=False,
                             finish_reason=None, num_output_tokens=out.num_output_tokens - cut)
        self.n += len(out.new_token_ids)
        if out.finished:  # the replica runs its generator to the end on its own
            await self.stream.aclose()
        return out

    def cancel(self) -> None:
        self.cancelled = True
        asyncio.ensure_future(self.stream.aclose())


class EngineHandle:
    """Stands in for a DeploymentHandle; call i dies after `deaths[i]` tokens (None: never)."""

    def __init__(self, engine: AsyncEngine, deaths: list[int | None]) -> None:
        self.engine, self.deaths = engine, list(deaths)
        self.calls: list[tuple] = []

    def options(self, stream: bool = False) -> EngineHandle:
        return self

    @property
    def generate(self) -> EngineHandle:
        return self

    def remote(self, prompt_ids, params, request_id) -> DyingResponse:
        self.calls.append((list(prompt_ids), params, request_id))
        die = self.deaths.pop(0) if self.deaths else None
        return DyingResponse(self.engine.generate(prompt_ids, params, request_id), die)


@pytest.fixture(scope="module")
def raw(llm: LLM) -> Engine:
    """The tiny model in an engine without text, as every serving replica runs it."""
    return Engine(llm.engine.model_cfg, llm.engine.cfg, detokenize=False)


async def assert_no_page_left(raw: Engine, engine: AsyncEngine) -> None:
    """Once the engine has let go of every request (the aborts of dead calls land between two
    steps; the deadline is a hang guard only), no page is in use."""
    deadline = asyncio.get_running_loop().time() + 60
    while raw.has_unfinished() or engine.num_open_streams():
        assert asyncio.get_running_loop().time() < deadline, "a request never ended"
        await asyncio.sleep(0.01)
    raw.allocator.check_integrity()
    assert raw.num_pages_used == 0


def api_client(llm: LLM, handle: EngineHandle) -> tuple[DetokenizingClient, HandleClient]:
    """What build_api makes of a HandleClient: text from the API's detokenizer."""
    inner = HandleClient(handle)
    return DetokenizingClient(inner, llm.tokenizer), inner


async def run(client, prompt_ids, params) -> tuple[list[int], str, str | None, int]:
    ids, text, reason, count = [], "", None, 0
    async for out in client.generate(prompt_ids, params, "r"):
        ids += out.new_token_ids
        text += out.new_text
        reason, count = out.finish_reason, out.num_output_tokens
    return ids, text, reason, count


SEEDED = dict(max_tokens=40, temperature=1.5, top_k=0, seed=5, ignore_eos=True)


async def test_the_stand_in_dies_at_its_token_even_inside_a_merged_output() -> None:
    async def merged():  # one output carrying three steps' tokens, as a busy engine sends it
        yield RequestOutput("r", [7, 8, 9], "", True, "length", num_output_tokens=3)

    response = DyingResponse(merged(), die_after=2)
    out = await anext(response)
    assert (out.new_token_ids, out.finished, out.finish_reason, out.num_output_tokens) == (
        [7, 8], False, None, 2)
    with pytest.raises(ActorDiedError):
        await anext(response)


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True),
    SamplingParams(max_tokens=40, temperature=1.0, top_k=50, seed=11, ignore_eos=True),
    SamplingParams(**SEEDED),  # multi-byte characters, some split across tokens
], ids=["greedy", "seeded", "multibyte"])
async def test_stream_resumes_with_the_same_tokens_and_text(llm: LLM, raw: Engine,
                                                            params) -> None:
    engine = AsyncEngine(raw)
    prompt = llm.tokenizer.encode(PROMPT)
    clean = await run(api_client(llm, EngineHandle(engine, []))[0], prompt, params)
    ref = llm.generate(prompt, params)[0]  # the engine's own detokenizer
    assert clean == (ref.token_ids, ref.text, "length", 40)
    handle = EngineHandle(engine, [5, 3])  # two replicas die, the third one finishes
    client, inner = api_client(llm, handle)
    assert await run(client, prompt, params) == clean
    assert inner.num_resumes == 2 and len(clean[0]) == 40
    (p0, _, _), (p1, q1, r1), (p2, q2, r2) = handle.calls
    n1 = len(p1) - len(prompt)
    assert p1 == prompt + clean[0][:n1] and q1.max_tokens == 40 - n1 and q1.resumed_tokens == n1
    assert r1 == "r-resume1" and r2 == "r-resume2" and q2.resumed_tokens == len(p2) - len(prompt)
    await assert_no_page_left(raw, engine)
    engine.close()


@pytest.mark.parametrize("kw", [dict(max_tokens=30, temperature=0.0, ignore_eos=True), SEEDED],
                         ids=["greedy", "multibyte"])
async def test_stop_string_spanning_the_failure_point(llm: LLM, raw: Engine, kw: dict) -> None:
    engine = AsyncEngine(raw)
    prompt = llm.tokenizer.encode(PROMPT)
    text = llm.generate(prompt, SamplingParams(**kw))[0].text
    wide = next((i for i, c in enumerate(text) if ord(c) > 127), 8)
    stop = text[wide:wide + 6]  # some text around token 3-4, multi-byte characters in it
    params = SamplingParams(**kw, stop=[stop])
    ref = llm.generate(prompt, params)[0]
    clean = await run(api_client(llm, EngineHandle(engine, []))[0], prompt, params)
    assert clean == (ref.token_ids, ref.text, "stop", len(ref.token_ids))
    assert stop not in clean[1]
    for die_after in range(1, len(ref.token_ids) + 1):
        # The API ended the last request at its stop string: the engine lets go of it (and of
        # its pages) once the cancelled call's abort lands.
        await assert_no_page_left(raw, engine)
        client, inner = api_client(llm, EngineHandle(engine, [die_after]))
        # The same tokens too: the API ends the request at the stop string on either side of
        # the failure point, and the usage counts only what the client got.
        assert await run(client, prompt, params) == clean, die_after
        assert inner.num_resumes == (die_after < len(ref.token_ids))
    await assert_no_page_left(raw, engine)
    engine.close()


async def test_no_replica_left_ends_with_an_error_event(llm: LLM, raw: Engine) -> None:
    engine = AsyncEngine(raw)
    handle = EngineHandle(engine, [2, 0, 0, 0])  # every replica dies: 3 resumes, then give up
    app = build_api(HandleClient(handle), llm.tokenizer, "tiny", 2048)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://test") as http:
        r = await asyncio.wait_for(http.post("/v1/completions", json={
            "prompt": PROMPT, "max_tokens": 20, "temperature": 0, "stream": True}), 30)
    events = [e.removeprefix("data: ") for e in r.text.split("\n\n") if e]
    assert r.status_code == 200 and events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["type"] == "server_error"
    assert len(handle.calls) == 4
    await assert_no_page_left(raw, engine)
    engine.close()


async def test_a_timeout_bounds_every_wait() -> None:
    class Silent:
        cancelled = False

        def __aiter__(self):
            return self

        async def __anext__(self):
            await asyncio.sleep(3600)

        def cancel(self) -> None:
            self.cancelled = True

    class SilentHandle(EngineHandle):
        def remote(self, *args) -> Silent:
            self.response = Silent()
            return self.response

    handle = SilentHandle(None, [])
    client = HandleClient(handle, timeout_s=0.1)
    with pytest.raises(TimeoutError, match="no output"):
        await asyncio.wait_for(run(client, [1, 2], SamplingParams()), 5)
    assert handle.response.cancelled

"""The gRPC service over a real engine, through an in-process grpc.aio server.

The server hands each call to the GrpcService mixin the way Serve's proxy and replica do: a
RayServegRPCContext built from the call's context, applied back onto it after the answer (a
stream's error raised after its code is set). Outputs equal the HTTP routes' for the same
prompt; errors carry the documented codes; every page comes back.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import httpx
import pytest
from ray.serve.grpc_util import RayServegRPCContext

from api.grpc_service import GrpcCallFailed, GrpcService
from api.proto import pdserve_pb2 as pb
from api.proto import pdserve_pb2_grpc
from api.server import build_api
from engine.async_engine import AsyncEngine
from engine.llm import LLM
from serving.limits import Limits

pytestmark = pytest.mark.anyio
PROMPT = "Hello there, how are"
MODEL = "tiny-llama"
KEY = "sk-grpc-test"
Code = grpc.StatusCode


class Ingress(GrpcService):
    """The mixin as the Ingress deployment holds it."""

    def __init__(self, app) -> None:
        self.grpc_attach(app)


class ProxyLike(pdserve_pb2_grpc.GenerationServicer):
    """What Serve's proxy + replica do with a call, in one process."""

    def __init__(self, ingress: Ingress) -> None:
        self.ingress = ingress

    async def Generate(self, request, context):
        rctx = RayServegRPCContext(context)
        answer = await self.ingress.Generate(request, grpc_context=rctx)
        rctx._set_on_grpc_context(context)
        return answer

    async def GenerateStream(self, request, context):
        rctx = RayServegRPCContext(context)
        try:
            async for msg in self.ingress.GenerateStream(request, grpc_context=rctx):
                yield msg
        except GrpcCallFailed:
            await context.abort(rctx.code(), rctx.details())


async def serve(llm: LLM, api_keys: list[str] | None = None, limits: Limits | None = None):
    engine = AsyncEngine(llm.engine)
    # [] rather than None: the keys are these, never $PDSERVE_API_KEYS of the machine
    app = build_api(engine, llm.tokenizer, MODEL, llm.engine.max_model_len, limits=limits,
                    api_keys=api_keys or [])
    server = grpc.aio.server()
    pdserve_pb2_grpc.add_GenerationServicer_to_server(ProxyLike(Ingress(app)), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return engine, app, server, port


@pytest.fixture
async def cluster(llm: LLM):
    engine, app, server, port = await serve(llm)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield pdserve_pb2_grpc.GenerationStub(channel), app
    await server.stop(None)
    await settle(engine, llm)


async def settle(engine: AsyncEngine, llm: LLM) -> None:
    for _ in range(200):  # a cancelled call's abort reaches the engine a few steps later
        if llm.engine.num_pages_used == 0 and not llm.engine.has_unfinished():
            break
        await asyncio.sleep(0.01)
    engine.close()
    assert not llm.engine.has_unfinished()
    assert llm.engine.num_pages_used == 0  # every page of every request came back


def greedy(**kw) -> pb.GenerateRequest:
    params = pb.SamplingParameters(max_new_tokens=kw.pop("max_new_tokens", 8), temperature=0)
    for name, value in kw.pop("params", {}).items():
        field = getattr(params, name)
        field.extend(value) if isinstance(value, list) else setattr(params, name, value)
    return pb.GenerateRequest(parameters=params, **kw)


async def http_completion(app, prompt: str | list[int], **body) -> dict:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://test") as http:
        r = await http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 8,
                                                     "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


async def collect_stream(call: AsyncIterator[pb.GenerateResponse]) -> list[pb.GenerateResponse]:
    return [msg async for msg in call]


async def test_unary_and_stream_equal_http(cluster, llm: LLM) -> None:
    stub, app = cluster
    ids = llm.tokenizer.encode(PROMPT)
    http = await http_completion(app, ids)
    unary = await stub.Generate(greedy(token_ids=ids))
    assert unary.text == http["choices"][0]["text"]
    assert unary.finish_reason == pb.FINISH_REASON_LENGTH
    assert (unary.usage.prompt_tokens, unary.usage.completion_tokens,
            unary.usage.total_tokens) == (len(ids), 8, len(ids) + 8)
    assert unary.request_id.startswith("grpc-")
    msgs = await collect_stream(stub.GenerateStream(greedy(token_ids=ids)))
    assert [t for m in msgs for t in m.token_ids] == list(unary.token_ids)
    assert "".join(m.text for m in msgs) == unary.text
    assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in msgs[:-1])
    assert msgs[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert msgs[-1].usage == unary.usage
    by_text = await stub.Generate(greedy(text=PROMPT))
    assert by_text.token_ids == unary.token_ids


async def test_logprobs_equal_http(cluster) -> None:
    stub, app = cluster
    http = (await http_completion(app, PROMPT, logprobs=2))["choices"][0]["logprobs"]
    unary = await stub.Generate(greedy(text=PROMPT, params={"logprobs": 2}))
    assert len(unary.logprobs) == 8
    assert [lp.logprob for lp in unary.logprobs] == pytest.approx(http["token_logprobs"],
                                                                  abs=1e-6)
    assert [lp.text for lp in unary.logprobs] == http["tokens"]
    for lp in unary.logprobs:
        assert lp.token_id in unary.token_ids and len(lp.top) == 2
        assert lp.top[0].logprob >= lp.top[1].logprob
    msgs = await collect_stream(stub.GenerateStream(greedy(text=PROMPT,
                                                           params={"logprobs": 0})))
    assert [lp.token_id for m in msgs for lp in m.logprobs] == list(unary.token_ids)
    assert (await stub.Generate(greedy(text=PROMPT))).logprobs == []


async def test_stop_string_is_cut(cluster) -> None:
    stub, _ = cluster
    text = (await stub.Generate(greedy(text=PROMPT))).text
    stop = text[5:8]
    r = await stub.Generate(greedy(text=PROMPT, params={"stop": [stop]}))
    assert r.finish_reason == pb.FINISH_REASON_STOP
    assert r.text == text[: text.index(stop)]


BAD = [({}, "prompt is empty"), ({"text": "hi", "token_ids": [1]}, "not both"),
       ({"token_ids": [10**6]}, "outside the vocabulary"),
       ({"text": "hi", "params": {"stop": ["a", "b", "c", "d", "e"]}}, "stop sequences"),
       ({"text": "hi", "params": {"stop_token_ids": [10**6]}}, "outside the vocabulary"),
       ({"text": "hi", "params": {"temperature": 200.0}}, "temperature"),
       ({"text": "hi", "params": {"top_p": 1.5}}, "top_p"),
       ({"text": "hi", "params": {"logprobs": 21}}, "logprobs"),
       ({"text": "hi", "max_new_tokens": 0}, "max_new_tokens"),
       ({"text": "hi", "max_new_tokens": 10**6}, "maximum context length")]


@pytest.mark.parametrize("stream", [False, True])
async def test_bad_input_is_invalid_argument(cluster, stream: bool) -> None:
    stub, _ = cluster
    cases = [*BAD, ({"text": "hi", "model": "other"}, "does not exist")]
    for kw, words in cases:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            if stream:
                await collect_stream(stub.GenerateStream(greedy(**kw)))
            else:
                await stub.Generate(greedy(**kw))
        want = Code.NOT_FOUND if "model" in kw else Code.INVALID_ARGUMENT
        assert info.value.code() == want, (kw, info.value)
        assert words in info.value.details(), (kw, info.value.details())


async def test_api_key_from_metadata(llm: LLM) -> None:
    engine, app, server, port = await serve(llm, api_keys=[KEY])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pdserve_pb2_grpc.GenerationStub(channel)
        for metadata in (None, [("authorization", "Bearer wrong")],
                         [("authorization", KEY)]):
            for call in (stub.Generate, lambda r, **kw: collect_stream(
                    stub.GenerateStream(r, **kw))):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call(greedy(text=PROMPT), metadata=metadata)
                assert info.value.code() == Code.UNAUTHENTICATED
                assert KEY not in info.value.details()
        assert app.state.keys.num_refused == 6  # one count with HTTP's 401s, on /metrics
        ok = await stub.Generate(greedy(text=PROMPT), metadata=[("authorization",
                                                                  f"bearer {KEY}")])
        assert len(ok.token_ids) == 8
    await server.stop(None)
    await settle(engine, llm)


async def test_overload_is_resource_exhausted_and_cancel_frees(llm: LLM) -> None:
    engine, app, server, port = await serve(llm, limits=Limits(max_concurrent_requests=1))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pdserve_pb2_grpc.GenerationStub(channel)
        running = stub.GenerateStream(greedy(text=PROMPT, max_new_tokens=1000,
                                             params={"ignore_eos": True}))
        first = await running.read()
        assert len(first.token_ids) >= 1
        for call in (stub.Generate, lambda r: collect_stream(stub.GenerateStream(r))):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(greedy(text=PROMPT))
            assert info.value.code() == Code.RESOURCE_EXHAUSTED
            assert "overloaded" in info.value.details()
        running.cancel()  # the client goes away: its request is aborted, the slot is free
        for _ in range(200):
            if app.state.admission.active == 0:
                break
            await asyncio.sleep(0.01)
        assert app.state.admission.active == 0
        assert len((await stub.Generate(greedy(text=PROMPT))).token_ids) == 8
    await server.stop(None)
    await settle(engine, llm)

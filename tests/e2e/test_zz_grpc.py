"""gRPC through Serve's gRPC proxy on the shared cluster (grpc_options in conftest.py).

Unary and streaming calls give the tokens of an HTTP greedy completion of the same prompt ids
(and HF's), on both applications, picked by the `application` metadata; errors come back with
their codes. Runs before test_zz_pages_freed, which then checks that no page was left behind.
"""

from __future__ import annotations

import random
import time

import grpc
import httpx
import pytest

from api.proto import pdserve_pb2 as pb
from api.proto import pdserve_pb2_grpc
from tests.hf_reference import hf_greedy

MAX = 16
APPS = {"pd": "base", "colo": "colocated"}


@pytest.fixture(scope="module")
def stub(cluster):
    with grpc.insecure_channel(cluster["grpc"]) as channel:
        grpc.channel_ready_future(channel).result(timeout=60)
        yield pdserve_pb2_grpc.GenerationStub(channel)


def _request(prompt: list[int], **params) -> pb.GenerateRequest:
    params = {"max_new_tokens": MAX, "temperature": 0, "ignore_eos": True, **params}
    return pb.GenerateRequest(token_ids=prompt, parameters=pb.SamplingParameters(**params))


def _http_text(base: str, prompt: list[int]) -> str:
    body = {"prompt": prompt, "max_tokens": MAX, "temperature": 0, "ignore_eos": True}
    r = httpx.post(f"{base}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


@pytest.mark.parametrize("app", sorted(APPS))
def test_unary_and_stream_equal_http_and_hf(cluster, stub, app: str) -> None:
    rng = random.Random(7)
    prompt = [rng.randrange(6, 2000) for _ in range(40)]
    ref = hf_greedy(cluster["model_dir"], prompt, MAX)
    meta = [("application", app)]
    unary = stub.Generate(_request(prompt), metadata=meta, timeout=120)
    assert list(unary.token_ids) == ref
    assert unary.text == _http_text(cluster[APPS[app]], prompt)
    assert unary.finish_reason == pb.FINISH_REASON_LENGTH
    assert (unary.usage.prompt_tokens, unary.usage.completion_tokens) == (40, MAX)
    msgs = list(stub.GenerateStream(_request(prompt, logprobs=1), metadata=meta, timeout=120))
    assert [t for m in msgs for t in m.token_ids] == ref
    assert "".join(m.text for m in msgs) == unary.text
    assert [lp.token_id for m in msgs for lp in m.logprobs] == ref
    assert msgs[-1].usage == unary.usage
    assert msgs[-1].finish_reason == pb.FINISH_REASON_LENGTH


@pytest.mark.parametrize("stream", [False, True])
def test_errors_have_their_codes(stub, stream: bool) -> None:
    cases = [(pb.GenerateRequest(), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
             (_request([10**6]), grpc.StatusCode.INVALID_ARGUMENT, "vocabulary"),
             (_request([5], temperature=500), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
             (pb.GenerateRequest(text="hi", model="nope"), grpc.StatusCode.NOT_FOUND, "nope")]
    for request, code, words in cases:
        with pytest.raises(grpc.RpcError) as info:
            call = stub.GenerateStream if stream else stub.Generate
            result = call(request, metadata=[("application", "pd")], timeout=60)
            if stream:
                list(result)
        assert info.value.code() == code, info.value
        assert words in info.value.details()


def test_cancelled_stream_frees_its_pages(cluster, stub) -> None:
    request = pb.GenerateRequest(text="The river", parameters=pb.SamplingParameters(
        max_new_tokens=400, temperature=0, ignore_eos=True))
    call = stub.GenerateStream(request, metadata=[("application", "pd")], timeout=120)
    assert len(next(call).token_ids) >= 1
    call.cancel()  # the client goes away mid-stream
    deadline = time.time() + 30  # a hang guard: the abort travels ingress -> decode
    while not _no_pages(httpx.get(f"{cluster['base']}/metrics", timeout=30).text):
        assert time.time() < deadline, "the cancelled stream's pages were not freed"
        time.sleep(0.5)


def _no_pages(metrics: str) -> bool:
    used = [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
            if line.startswith("pdserve_kv_pages_used{")]
    return bool(used) and not any(used)

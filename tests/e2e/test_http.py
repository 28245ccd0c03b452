"""End-to-end over real HTTP against the running Serve cluster (see conftest.py)."""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
import pytest

from bench.soak import parse_metrics
from tests.hf_reference import hf_greedy

MAX = 16


def _prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(6, 2000) for _ in range(n)]


def _complete(base: str, prompt, **kw) -> dict:
    body = {"model": "tiny-llama", "prompt": prompt, "max_tokens": MAX, "temperature": 0,
            "ignore_eos": True, **kw}
    r = httpx.post(f"{base}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def _stream(base: str, path: str, body: dict) -> list[dict]:
    chunks = []
    with httpx.stream("POST", f"{base}{path}", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data:"):
                data = line[5:].strip()
                if data == "[DONE]":
                    chunks.append("[DONE]")
                else:
                    chunks.append(json.loads(data))
    return chunks


@pytest.fixture(scope="module")
def tokenizer(cluster):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(cluster["model_dir"])


@pytest.mark.parametrize("n", [1, 20, 150])
def test_disaggregated_and_colocated_equal_hf(cluster, tokenizer, n):
    prompt = _prompt(n, n)
    ref_ids = hf_greedy(cluster["model_dir"], prompt, MAX)
    ref_text = tokenizer.decode(ref_ids, skip_special_tokens=True)
    for base in (cluster["base"], cluster["colocated"]):
        out = _complete(base, prompt)
        assert out["choices"][0]["text"] == ref_text
        assert out["usage"] == {"prompt_tokens": n, "completion_tokens": MAX,
                                "total_tokens": n + MAX}
        assert out["choices"][0]["finish_reason"] == "length"


def test_stream_concatenates_to_full_text(cluster):
    prompt = "Once upon a time, the lighthouse keeper"
    full = _complete(cluster["base"], prompt)["choices"][0]["text"]
    chunks = _stream(cluster["base"], "/v1/completions",
                     {"prompt": prompt, "max_tokens": MAX, "temperature": 0,
                      "ignore_eos": True, "stream": True})
    assert chunks[-1] == "[DONE]"
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1] if c["choices"]) == full


def test_chat_streaming(cluster):
    body = {"messages": [{"role": "user", "content": "Tell me about rivers."}],
            "max_tokens": 12, "temperature": 0, "stream": True}
    chunks = _stream(cluster["base"], "/v1/chat/completions", body)
    assert chunks[-1] == "[DONE]"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1]
                   if c["choices"])
    full = httpx.post(f"{cluster['base']}/v1/chat/completions", timeout=60,
                      json={**body, "stream": False}).json()
    assert text == full["choices"][0]["message"]["content"]
    assert full["choices"][0]["finish_reason"] in ("stop", "length")


def test_tgi_generate_with_details(cluster, tokenizer):
    prompt = "The old bridge"
    ids = tokenizer.encode(prompt)
    r = httpx.post(f"{cluster['base']}/generate", timeout=60, json={
        "inputs": prompt, "parameters": {"max_new_tokens": 8, "details": True}})
    assert r.status_code == 200, r.text
    body = r.json()
    tokens = [t["id"] for t in body["details"]["tokens"]]
    assert body["details"]["generated_tokens"] == len(tokens) <= 8
    assert tokens == hf_greedy(cluster["model_dir"], ids, 8)[:len(tokens)]
    events = _stream(cluster["base"], "/generate_stream", {
        "inputs": prompt, "parameters": {"max_new_tokens": 8, "details": True}})
    assert [e["token"]["id"] for e in events] == tokens
    assert events[-1]["generated_text"] == body["generated_text"]


def test_32_concurrent_streams(cluster):
    async def one(client: httpx.AsyncClient, i: int) -> int:
        n = 0
        body = {"prompt": _prompt(100 + i, 10 + i), "max_tokens": 24, "temperature": 0.7,
                "seed": i, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        async with client.stream("POST", f"{cluster['base']}/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data:") and "[DONE]" not in line:
                    chunk = json.loads(line[5:])
                    if chunk.get("usage"):
                        n = chunk["usage"]["completion_tokens"]
        return n

    async def main():
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(*[one(client, i) for i in range(32)])

    assert asyncio.run(main()) == [24] * 32


def test_batched_submission_streams_a_burst_and_a_cancelled_stream_frees_its_pages(cluster):
    """The colocated app sends many requests a Serve call (conftest.py): every stream of a
    burst gets its tokens, equal to the same request sent alone, and a client that leaves
    mid-stream has its request aborted through the token socket."""
    base = cluster["colocated"]
    alone = [_complete(base, _prompt(300 + i, 12))["choices"][0]["text"] for i in range(2)]

    async def one(client: httpx.AsyncClient, i: int) -> str:
        body = {"prompt": _prompt(300 + i % 2, 12), "max_tokens": MAX, "temperature": 0,
                "ignore_eos": True, "stream": True}
        text = []
        async with client.stream("POST", f"{base}/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data:") and "[DONE]" not in line:
                    text += [c["text"] for c in json.loads(line[5:])["choices"]]
        return "".join(text)

    async def left_early(client: httpx.AsyncClient) -> None:
        body = {"prompt": "The river", "max_tokens": 2000, "ignore_eos": True, "stream": True}
        async with client.stream("POST", f"{base}/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    return  # the client goes away after its first token

    async def main():
        async with httpx.AsyncClient(timeout=300) as client:
            texts = await asyncio.gather(*[one(client, i) for i in range(24)],
                                         left_early(client))
        return texts[:-1]

    before = _colocated_metric(cluster, "pdserve_generated_tokens_total")
    assert asyncio.run(main()) == [alone[i % 2] for i in range(24)]
    deadline = time.time() + 120  # a hang guard: the abort travels ingress -> colocated
    while True:  # until a metrics snapshot (pushed every 0.5 s) shows the burst, and no pages
        generated = sum(_colocated_metric(cluster, "pdserve_generated_tokens_total")) - sum(before)
        if generated >= 24 * MAX and not any(_colocated_metric(cluster, "pdserve_kv_pages_used")):
            break
        assert time.time() < deadline, "the colocated replica still holds pages"
        time.sleep(0.5)
    # The stream that left would have run to 2000 tokens had its abort not arrived.
    assert generated < 24 * MAX + 1000


def _colocated_metric(cluster, name: str) -> list[float]:
    lines = httpx.get(f"{cluster['base']}/metrics", timeout=30).text.splitlines()
    found = [float(line.rsplit(" ", 1)[1]) for line in lines
             if line.startswith(name + "{") and 'role="colocated"' in line]
    assert found, f"no {name} from the colocated replica"
    return found


def test_shared_prefix_moves_fewer_kv_bytes(cluster):
    def sent() -> dict[str, float]:
        """Bytes each decode replica has received. Per replica, because a replica killed by an
        earlier test (tests/e2e/test_kill.py) leaves /metrics at some point of this test: its
        bytes must not count as a change of the others'."""
        text = httpx.get(f"{cluster['base']}/metrics", timeout=30).text
        return {replica: value for (role, replica), value in
                parse_metrics(text, "pdserve_kv_transfer_bytes_total").items()
                if role == "decode"}

    def settled() -> dict[str, float]:
        """The bytes once every finished request is published: replicas publish every 0.5 s,
        so values unchanged over 1.5 s (three publishing periods of an idle cluster) are final.
        The 60 s deadline is a hang guard only."""
        deadline = time.monotonic() + 60
        prev = sent()
        while time.monotonic() < deadline:
            time.sleep(1.5)
            now = sent()
            if now == prev:
                return now
            prev = now
        raise AssertionError("the decode replicas' metrics never settled")

    def moved(before: dict[str, float], after: dict[str, float]) -> float:
        """Bytes received between two snapshots by the replicas live at the second (a replica
        new since the first counts from 0)."""
        return sum(v - before.get(replica, 0.0) for replica, v in after.items())

    shared = _prompt(7, 256)
    start = settled()
    _complete(cluster["base"], shared + [11, 12, 13])
    mid = settled()
    _complete(cluster["base"], shared + [21, 22])
    first, second = moved(start, mid), moved(mid, settled())
    assert first > 0 and 0 < second < first / 10  # 16 shared pages stay; 1 page moves


def test_openai_client(cluster):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{cluster['base']}/v1", api_key="none")
    full = client.completions.create(model="tiny-llama", prompt="A quiet morning", max_tokens=10,
                                     temperature=0)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny-llama", prompt="A quiet morning", max_tokens=10, temperature=0, stream=True)
        if c.choices)
    assert streamed == full.choices[0].text
    chat = client.chat.completions.create(
        model="tiny-llama", messages=[{"role": "user", "content": "Hi"}], max_tokens=6)
    assert chat.choices[0].message.role == "assistant"
    assert [m.id for m in client.models.list()] == ["tiny-llama"]


def test_huggingface_hub_client(cluster):
    hub = pytest.importorskip("huggingface_hub")
    client = hub.InferenceClient(cluster["base"])
    text = client.text_generation("The harbour at dusk", max_new_tokens=8)
    assert isinstance(text, str)
    details = client.text_generation("The harbour at dusk", max_new_tokens=8, details=True)
    assert details.generated_text == text and details.details.generated_tokens <= 8
    streamed = "".join(client.text_generation("The harbour at dusk", max_new_tokens=8,
                                              stream=True))
    assert streamed == text

"""The choices of one prompt share its pages: choice 0 runs first, the others start once its
first output is out and find the prompt's full pages in the prefix cache, on one engine and
across the prefill/decode split (in process, inline transport), where only the last partial page
crosses the KV transport for each extra choice. Every page comes back afterwards."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from api.server import build_api
from engine.llm import LLM
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from tests.api_harness import client_for, serving_engine
from tests.test_disaggregated_inprocess import inline_pair, no_pages_left

pytestmark = pytest.mark.anyio
PAGE = 16  # inline_pair's page size


class Recorder:
    """A generation client that notes when each request starts and its first output's
    `num_cached_tokens` (prompt tokens found in the prefix cache), in order."""

    def __init__(self, client) -> None:
        self.client = client
        self.events: list[tuple[str, str]] = []
        self.cached: dict[str, int] = {}

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        self.events.append(("start", request_id))
        first = True
        async for out in self.client.generate(prompt_ids, params, request_id):
            if first:
                first = False
                self.events.append(("first", request_id))
                self.cached[request_id] = out.num_cached_tokens
            yield out


def check_order(rec: Recorder, rid: str, n: int) -> None:
    """Choice 0 starts alone; the others only after its first output."""
    events = [e for e in rec.events if e[1] == rid or e[1].startswith(f"{rid}-")]
    assert events[:2] == [("start", rid), ("first", rid)]
    assert {e for e in events[2:] if e[0] == "start"} == {
        ("start", f"{rid}-{i}") for i in range(1, n)}


async def test_one_engine_prefills_the_prompt_once(llm: LLM) -> None:
    prompt = list(range(300, 337))  # 2 full pages + 5 tokens, new to this engine
    async with serving_engine(llm) as engine:
        rec = Recorder(engine)
        async with client_for(build_api(rec, llm.tokenizer, "tiny", 2048)) as http:
            r = await http.post("/v1/completions", json={
                "prompt": prompt, "max_tokens": 5, "temperature": 0, "n": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    ref = llm.generate(prompt, SamplingParams(max_tokens=5, temperature=0.0))[0]
    assert [c["text"] for c in body["choices"]] == [ref.text] * 3
    rid = body["id"]
    check_order(rec, rid, 3)
    # Only the partial last page (and at least the last token) is computed again.
    assert rec.cached == {rid: 0, f"{rid}-1": 2 * PAGE, f"{rid}-2": 2 * PAGE}
    llm.engine.check_integrity()
    assert llm.engine.num_pages_used == 0


async def test_disaggregated_choices_move_the_prompt_once(tiny_llama: str) -> None:
    ref_llm = LLM(tiny_llama, num_pages=128)
    prefill, decode = inline_pair(tiny_llama)
    rec = Recorder(decode)
    counters = decode.metrics.counters
    warm, prompt = list(range(400, 467)), list(range(500, 567))  # 67 tokens: 4 pages + 3
    body = {"max_tokens": 6, "temperature": 0, "ignore_eos": True}
    async with client_for(build_api(rec, ref_llm.tokenizer, "tiny", 2048)) as http:
        r = await http.post("/v1/completions", json={"prompt": warm, **body})
        assert r.status_code == 200, r.text
        five_pages = counters["pdserve_kv_transfer_bytes_total"]
        skipped = counters.get("pdserve_kv_transfer_blocks_skipped_total", 0)
        r = await http.post("/v1/completions", json={"prompt": prompt, "n": 3, **body})
        assert r.status_code == 200, r.text
        for worker in (prefill, decode):  # queued behind everything above: it ran by then
            await worker.engine.check_integrity()
    moved = counters["pdserve_kv_transfer_bytes_total"] - five_pages
    assert moved * 5 == five_pages * (5 + 1 + 1)  # the prompt once, then its last page twice
    assert counters["pdserve_kv_transfer_blocks_skipped_total"] - skipped == 2 * 4
    assert prefill.metrics.counters["pdserve_kv_transfer_bytes_sent_total"] == \
        counters["pdserve_kv_transfer_bytes_total"]

    out = r.json()
    ref = ref_llm.generate(prompt, SamplingParams(max_tokens=6, temperature=0.0,
                                                  ignore_eos=True))[0]
    assert [c["text"] for c in out["choices"]] == [ref.text] * 3
    rid = out["id"]
    check_order(rec, rid, 3)
    assert {k: v for k, v in rec.cached.items() if k.startswith(rid)} == {
        rid: 0, f"{rid}-1": 4 * PAGE, f"{rid}-2": 4 * PAGE}
    no_pages_left(prefill, decode)

"""bench.client: SSE parsing and stream timing, on a recorded stream with set arrival times."""

from __future__ import annotations

import json
import random

import pytest

from bench.client import RequestRecord, SSEParser, StreamState, completion_payload
from bench.workloads import RequestSpec


def _chunk(text: str, finish: str | None = None) -> dict:
    return {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}


# A recorded /v1/completions stream: a keep-alive comment, CRLF line ends in one event, an
# event whose text is empty (a token held back by the detokenizer), a chunk carrying two
# tokens, the usage chunk (empty choices) and [DONE].
RECORDED = (
    b": ping\n\n"
    + b"data: " + json.dumps(_chunk(" Hello")).encode() + b"\r\n\r\n"
    + b"data: " + json.dumps(_chunk("")).encode() + b"\n\n"
    + b"data: " + json.dumps(_chunk(" wor")).encode() + b"\n\n"
    + b"data: " + json.dumps(_chunk("ld!", "length")).encode() + b"\n\n"
    + b"data: " + json.dumps({"id": "cmpl-1", "object": "text_completion", "choices": [],
                              "usage": {"prompt_tokens": 7, "completion_tokens": 5,
                                        "total_tokens": 12}}).encode() + b"\n\n"
    + b"data: [DONE]\n\n"
)


def _parse(stream: bytes, cuts: list[int]) -> list[str]:
    parser, events, prev = SSEParser(), [], 0
    for c in [*cuts, len(stream)]:
        events += parser.feed(stream[prev:c])
        prev = c
    return events + parser.close()


def test_sse_parser_any_split_gives_same_events() -> None:
    whole = _parse(RECORDED, [])
    assert len(whole) == 6 and whole[-1] == "[DONE]"
    assert json.loads(whole[0])["choices"][0]["text"] == " Hello"
    assert _parse(RECORDED, list(range(1, len(RECORDED)))) == whole  # byte by byte
    rng = random.Random(0)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(RECORDED)), 12))
        assert _parse(RECORDED, cuts) == whole


def test_sse_parser_multiline_data_and_missing_final_blank_line() -> None:
    events = _parse(b"event: x\ndata: a\ndata:b\nid: 3\n\ndata: tail", [])
    assert events == ["a\nb", "tail"]


def test_stream_state_timing_from_recorded_stream() -> None:
    state = StreamState()
    times = [0.25, 0.26, 0.30, 0.40, 0.41, 0.42]  # arrival time of each event
    for data, t in zip(_parse(RECORDED, []), times):
        state.on_data(data, t)
    rec = state.finish(RequestRecord(prompt_len=7, max_tokens=5), start=0.05, end=0.5)
    assert rec.ok and rec.error is None
    assert rec.ttft == pytest.approx(0.20)  # first event with text
    assert rec.itl == pytest.approx([0.05, 0.10])  # the empty-text event is not a token
    assert rec.e2e == pytest.approx(0.37)  # at [DONE]
    assert rec.output_tokens == 5 and rec.prompt_tokens == 7  # from usage
    assert rec.tpot == pytest.approx((0.37 - 0.20) / 4)


def test_stream_state_counts_chunks_without_usage() -> None:
    state = StreamState()
    for i, data in enumerate([json.dumps(_chunk("a")), json.dumps(_chunk("b")), "[DONE]"]):
        state.on_data(data, 1.0 + i)
    rec = state.finish(RequestRecord(3, 2, prompt_tokens=3), start=0.5, end=9.0)
    assert rec.output_tokens == 2 and rec.ttft == 0.5 and rec.e2e == 2.5
    assert rec.tpot == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("events", "error"),
    [
        ([json.dumps(_chunk("a"))], "stream ended before [DONE]"),
        (["[DONE]"], "no output text in stream"),
        (["{not json", "[DONE]"], "bad JSON"),
        ([json.dumps({"error": {"message": "boom", "code": 500}}), "[DONE]"], "boom"),
    ],
)
def test_stream_state_errors(events: list[str], error: str) -> None:
    state = StreamState()
    for i, data in enumerate(events):
        state.on_data(data, float(i))
    rec = state.finish(RequestRecord(1, 1), start=0.0, end=5.0)
    assert not rec.ok and error in (rec.error or "")
    assert rec.ttft is None and rec.tpot is None


def test_single_token_has_no_tpot() -> None:
    rec = RequestRecord(1, 1, ttft=0.1, e2e=0.1, output_tokens=1)
    assert rec.ok and rec.tpot is None


def test_completion_payload() -> None:
    spec = RequestSpec([1, 2, 3], 3, 8)
    p = completion_payload("m", spec, extra={"top_k": 1})
    assert p == {"model": "m", "prompt": [1, 2, 3], "max_tokens": 8, "temperature": 0.0,
                 "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True},
                 "top_k": 1}
    p = completion_payload("m", spec, ignore_eos=False, include_usage=False)
    assert "ignore_eos" not in p and "stream_options" not in p

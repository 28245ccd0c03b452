"""engine/hop_log.py: with PDSERVE_HOP_LOG set, a request through a prefill and a decode worker
leaves a line per hop, in the order it passed them; unset, nothing is written."""

from __future__ import annotations

import asyncio
import json

import pytest

from engine import hop_log
from engine.sampling_params import SamplingParams
from tests.test_disaggregated_inprocess import _collect, inline_pair

PARAMS = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)


@pytest.fixture
def hop_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(hop_log.ENV, str(tmp_path / "hops"))
    hop_log.reopen()
    yield tmp_path / "hops"
    monkeypatch.delenv(hop_log.ENV, raising=False)
    assert hop_log.reopen() is None


def test_a_disaggregated_request_passes_the_hops_in_order(tiny_llama, hop_dir):
    _, decode = inline_pair(tiny_llama)
    assert not hop_dir.exists()  # no file before the process's first hop
    asyncio.run(_collect(decode, list(range(100, 140)), PARAMS, "r1"))
    hop_log.flush()
    [path] = hop_dir.glob("hops-*.jsonl")  # one process: one file
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert {line["id"] for line in lines} == {"r1"}
    assert [line["t"] for line in lines] == sorted(line["t"] for line in lines)
    hops = [line["hop"] for line in lines]
    assert sorted(hops) == sorted([
        "decode.recv", "decode.prefill_call", "engine.reserve", "decode.reserved",
        "prefill.recv", "engine.add", "prefill.done", "decode.prefill_done", "decode.kv_in",
        "engine.admit"])  # each once
    # The prefill call goes out before the reservation is made (decode/worker.py), so the
    # reservation (the decode engine's step thread) and the prefill run side by side: each
    # path keeps its order, and both end before the first token comes.
    for path in (["decode.recv", "decode.prefill_call", "engine.reserve", "decode.reserved",
                  "decode.prefill_done", "decode.kv_in", "engine.admit"],
                 ["decode.prefill_call", "prefill.recv", "engine.add", "prefill.done",
                  "decode.prefill_done"]):
        assert [hop for hop in hops if hop in path] == path


def test_without_the_variable_nothing_is_written(tiny_llama, hop_dir, monkeypatch):
    _, decode = inline_pair(tiny_llama)
    asyncio.run(_collect(decode, list(range(100, 140)), PARAMS, "on"))
    hop_log.flush()
    monkeypatch.delenv(hop_log.ENV)
    assert hop_log.reopen() is None
    asyncio.run(_collect(decode, list(range(100, 140)), PARAMS, "off"))
    [path] = hop_dir.glob("hops-*.jsonl")
    assert {json.loads(line)["id"] for line in path.read_text().splitlines()} == {"on"}

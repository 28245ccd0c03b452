"""The prefill worker hands a prompt's KV to its transport with the engine's export stream
current: every transport reads the pages on the sending thread's current stream, and on the
engine's own stream that read would wait for the step launched since (engine/llm_engine.py,
`_export`). On the CPU the stream switch is recorded; on the GPU,
tests/gpu/test_host_copy.py checks that an export does not wait for that step."""

from __future__ import annotations

import contextlib

import torch

from prefill.worker import PrefillWorker


class _Engine:
    def __init__(self, export_stream: object) -> None:
        self.export_stream = export_stream


def _worker(monkeypatch, export_stream: object) -> tuple[PrefillWorker, list]:
    current: list = [None]
    seen: list = []

    @contextlib.contextmanager
    def stream(s):
        before, current[0] = current[0], s
        try:
            yield
        finally:
            current[0] = before

    class Transport:
        def send(self, payload):
            seen.append((payload, current[0]))
            return "handle"

    monkeypatch.setattr(torch.cuda, "stream", stream)
    return PrefillWorker(_Engine(export_stream), Transport(), "fp"), seen


def test_the_kv_is_sent_on_the_engines_export_stream(monkeypatch):
    worker, seen = _worker(monkeypatch, export_stream="export stream")
    assert worker._send("payload") == "handle"
    assert seen == [("payload", "export stream")]


def test_an_engine_without_one_sends_as_it_is(monkeypatch):
    worker, seen = _worker(monkeypatch, export_stream=None)  # a CPU engine
    assert worker._send("payload") == "handle"
    assert seen == [("payload", None)]


def test_a_cpu_engine_has_no_export_stream(tiny_llama):
    from engine.config import EngineConfig, ModelConfig
    from engine.llm_engine import Engine

    engine = Engine(ModelConfig(tiny_llama), EngineConfig(page_size=16, num_pages=8))
    assert engine.export_stream is None

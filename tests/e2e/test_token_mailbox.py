"""The token mailbox on a live Ray: batches arrive in order through the reader, and a replica's
sink aborts its requests once the mailbox (its ingress replica) is gone."""

from __future__ import annotations

import asyncio
import time

from engine.metrics import Metrics
from engine.outputs import RequestOutput
from serving.token_mailbox import MailboxReader, MailboxSink


def _out(rid: str, tok: int, finished: bool = False) -> RequestOutput:
    return RequestOutput(rid, [tok], "", finished=finished)


def test_reader_gets_every_batch_in_order(cluster):
    async def main() -> list[list[int]]:
        reader = MailboxReader()
        a, b = reader.open("a"), reader.open("b")
        sink = MailboxSink(reader.mailbox, Metrics("decode", "t"), on_lost=lambda rids: None)
        for step in range(5):  # one message per step, both requests in it
            sink.put(_out("a", step))
            sink.put(_out("b", 10 + step, finished=step == 4))
            sink.flush()
        got_a = [(await asyncio.wait_for(a.get(), 60)).new_token_ids[0] for _ in range(5)]
        got_b = [(await asyncio.wait_for(b.get(), 60)).new_token_ids[0] for _ in range(5)]
        return [got_a, got_b]

    assert asyncio.run(main()) == [[0, 1, 2, 3, 4], [10, 11, 12, 13, 14]]


def test_sink_aborts_its_requests_when_the_mailbox_is_gone(cluster):
    import ray

    reader = MailboxReader()
    lost: list[list[str]] = []
    sink = MailboxSink(reader.mailbox, Metrics("decode", "t"), on_lost=lost.append)
    sink.open("a", time.perf_counter())
    sink.open("b", time.perf_counter())
    ray.kill(reader.mailbox.actor, no_restart=True)  # the ingress replica died
    deadline = time.monotonic() + 60  # a hang guard: the failed put must come back at all
    while not lost:
        assert time.monotonic() < deadline, "the sink never noticed the dead mailbox"
        sink.put(_out("a", 1))
        sink.flush()
        time.sleep(0.05)
    assert lost == [["a", "b"]] and sink.lost
    sink.put(_out("a", 2))
    sink.flush()  # a lost sink sends nothing more, and reports once
    assert lost == [["a", "b"]]

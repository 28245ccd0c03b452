"""OutputStreams (engine/output_streams.py) alone, the step thread played by the test's own
calls: what a reader sees of delivered, failed and ended streams, and when a request counts as
abandoned."""

from __future__ import annotations

import asyncio

import pytest

from engine.output_streams import OutputStreams
from engine.outputs import RequestOutput


def out(rid: str, tokens: list[int], finished: bool = False) -> RequestOutput:
    return RequestOutput(rid, tokens, "".join(f"<{t}>" for t in tokens), finished,
                         "length" if finished else None)


async def read(streams: OutputStreams, rid: str, stream) -> list[RequestOutput]:
    async def all_of() -> list[RequestOutput]:
        return [o async for o in streams.drain(rid, stream)]

    return await asyncio.wait_for(all_of(), 60)  # a hang guard, not a speed bound


def test_outputs_that_piled_up_reach_the_reader_as_one() -> None:
    abandoned: list[str] = []

    async def main():
        streams = OutputStreams(on_abandon=abandoned.append)
        stream = streams.open("a")
        for o in (out("a", [1]), out("a", [2, 3]), out("a", [4], finished=True)):
            streams.deliver(o)
        streams.flush()  # one hand-off, read after all three were queued
        return await read(streams, "a", stream), len(streams)

    got, still_open = asyncio.run(main())
    assert [(o.new_token_ids, o.new_text, o.finished) for o in got] == [
        ([1, 2, 3, 4], "<1><2><3><4>", True)]
    assert still_open == 0 and abandoned == []


def test_a_sink_takes_every_output_and_the_stream_only_the_last() -> None:
    class Sink:
        def __init__(self) -> None:
            self.put_ids: list[list[int]] = []
            self.flushes = 0

        def put(self, o: RequestOutput) -> None:
            self.put_ids.append(o.new_token_ids)

        def flush(self) -> None:
            self.flushes += 1

    sink = Sink()

    async def main():
        streams = OutputStreams(on_abandon=lambda rid: None)
        stream = streams.open("a", sink)
        streams.deliver(out("a", [1]))
        streams.flush()
        streams.flush()  # nothing put since: the sink is not flushed again
        streams.deliver(out("a", [2], finished=True))
        streams.flush()
        return await read(streams, "a", stream)

    got = asyncio.run(main())
    assert sink.put_ids == [[1], [2]] and sink.flushes == 2
    assert [o.new_token_ids for o in got] == [[2]]


def test_a_failure_comes_after_what_was_delivered_before_it() -> None:
    abandoned: list[str] = []

    async def main():
        streams = OutputStreams(on_abandon=abandoned.append)
        stream = streams.open("a")
        streams.deliver(out("a", [1]))
        streams.fail("a", RuntimeError("step failed"))
        streams.flush()
        seen = []
        with pytest.raises(RuntimeError, match="step failed"):
            async for o in streams.drain("a", stream):
                seen.append(o.new_token_ids)
        return seen

    assert asyncio.run(main()) == [[1]]
    assert abandoned == ["a"]  # it ended before its last output: its pages are to be freed


def test_an_ended_stream_yields_what_came_before_and_stops() -> None:
    async def main():
        streams = OutputStreams(on_abandon=lambda rid: None)
        stream = streams.open("a")
        streams.deliver(out("a", [1]))
        streams.flush()
        await asyncio.sleep(0)  # the hand-off runs before the end is posted
        streams.end("a")
        return await read(streams, "a", stream), "a" in streams

    got, still_open = asyncio.run(main())
    assert [o.new_token_ids for o in got] == [[1]] and not still_open


def test_a_reader_that_stops_early_abandons_its_request_and_ids_are_unique() -> None:
    abandoned: list[str] = []

    async def main():
        streams = OutputStreams(on_abandon=abandoned.append)
        stream = streams.open("a")
        with pytest.raises(ValueError, match="already running"):
            streams.open("a")
        streams.deliver(out("a", [1]))
        streams.flush()
        reader = streams.drain("a", stream)
        first = await anext(reader)
        await reader.aclose()  # the client went away
        return first, len(streams)

    first, still_open = asyncio.run(main())
    assert first.new_token_ids == [1] and still_open == 0
    assert abandoned == ["a"]

"""Driving the client's output streams: start (primed), merge, collect, stop on disconnect.

A stream is primed (its first output awaited) before any response starts, so input that the
engine refuses (ValueError) still becomes a 4xx body instead of a broken 200 stream. Every
stream is closed on every exit path: closing is what aborts the request and frees its pages.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import Request

from api.context import GenerateClient
from api.errors import APIError, GenerationError
from engine.outputs import RequestOutput, TokenLogprob
from engine.sampling_params import SamplingParams

T = TypeVar("T")
Job = tuple[list[int], SamplingParams, str]  # prompt ids, params, request id


class Generation:
    """One request's outputs, first one already received.

    Iterate `outputs()` once, inside `aclosing(...)`; `aclose()` ends the request if it is
    still running (safe to call again once iteration is over).
    """

    def __init__(self, stream: AsyncIterator[RequestOutput], first: RequestOutput,
                 num_prompt_tokens: int) -> None:
        self._stream, self._first = stream, first
        self.num_prompt_tokens = num_prompt_tokens

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        out: RequestOutput | None = self._first
        try:
            while out is not None:
                if out.error is not None:
                    raise GenerationError(out.error)
                if out.finished and out.finish_reason == "abort":
                    raise GenerationError("the request was aborted by the server")
                yield out
                if out.finished:
                    return
                try:
                    out = await anext(self._stream, None)
                except ValueError as e:
                    raise APIError(str(e)) from None
                except Exception as e:
                    raise GenerationError(f"generation failed: {e}") from e
            raise GenerationError("the output stream ended before the request finished")
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        aclose = getattr(self._stream, "aclose", None)
        if aclose is not None:
            await aclose()


async def start(client: GenerateClient, prompt_ids: list[int], params: SamplingParams,
                request_id: str) -> Generation:
    stream = client.generate(prompt_ids, params, request_id)
    try:
        first = await anext(stream)
    except StopAsyncIteration:
        raise GenerationError("the request ended without output") from None
    except ValueError as e:  # the engine's own validation
        raise APIError(str(e)) from None
    except APIError:
        raise
    except Exception as e:
        raise GenerationError(f"generation failed: {e}") from e
    return Generation(stream, first, len(prompt_ids))


async def start_all(client: GenerateClient, jobs: list[Job], group: int = 1
                    ) -> list[Generation]:
    """Starts every job; if one is refused (or this is cancelled), closes the ones that started
    and re-raises.

    Jobs come in groups of `group` consecutive jobs on one prompt (its choices, see
    api/choices.py). A group's first job starts alone and the rest once its first output has
    arrived: by then the engine that ran it has the prompt's full pages in its prefix cache, so
    the rest reuse them instead of computing (or, disaggregated, fetching) them again. Groups
    start concurrently.
    """
    groups = [jobs[i:i + group] for i in range(0, len(jobs), group)]
    started = await _all_or_none([_start_group(client, g) for g in groups])
    return [gen for gens in started for gen in gens]


async def _start_group(client: GenerateClient, jobs: list[Job]) -> list[Generation]:
    first = await start(client, *jobs[0])
    try:
        rest = await _all_or_none([_start_one(client, job) for job in jobs[1:]])
    except BaseException:
        await first.aclose()
        raise
    return [first, *(gen for gens in rest for gen in gens)]


async def _start_one(client: GenerateClient, job: Job) -> list[Generation]:
    return [await start(client, *job)]


async def _all_or_none(starts: list[Awaitable[list[Generation]]]) -> list[list[Generation]]:
    """Runs every start to its end. If one fails, or this is cancelled, the generations the
    others started are closed (closing is what aborts them) and the first error is raised."""
    if not starts:
        return []
    tasks = [asyncio.ensure_future(s) for s in starts]
    try:
        await asyncio.wait(tasks)
    except BaseException:  # cancelled: the client went away while the jobs were starting
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await _close_started(tasks)
        raise
    failed = [t for t in tasks if t.cancelled() or t.exception() is not None]
    if failed:
        await _close_started(tasks)
        failed[0].result()  # raises its error
    return [t.result() for t in tasks]


async def _close_started(tasks: list[asyncio.Future]) -> None:
    for t in tasks:
        if t.done() and not t.cancelled() and t.exception() is None:
            await close_all(t.result())


async def merged(gens: list[Generation]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(index, output) pairs from several generations, in arrival order."""
    if len(gens) == 1:
        async with aclosing(gens[0].outputs()) as outs:
            async for out in outs:
                yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, gen: Generation) -> None:
        try:
            async with aclosing(gen.outputs()) as outs:
                async for out in outs:
                    queue.put_nowait((i, out))
            queue.put_nowait(done)
        except Exception as e:  # handed to the consumer, which re-raises it
            queue.put_nowait(e)

    # Cancelling a pump raises inside the client's stream, which aborts that request.
    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class Collected:
    """A whole generation: what the non-streaming responses are built from."""

    token_ids: list[int] = field(default_factory=list)
    token_texts: list[str] = field(default_factory=list)  # text delta owed to each token
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    prompt_logprobs: list[TokenLogprob | None] | None = None  # asked for: from the first output

    @property
    def text(self) -> str:
        return "".join(self.token_texts)

    def add(self, out: RequestOutput) -> None:
        self.token_ids += out.new_token_ids
        # A step's text belongs to its last token: earlier ones may be partial characters.
        self.token_texts += [""] * (len(out.new_token_ids) - 1) + [out.new_text]
        self.logprobs += out.new_logprobs
        self.finish_reason = out.finish_reason
        if self.prompt_logprobs is None:
            # A request resumed on another replica sends them again, for a longer prompt.
            self.prompt_logprobs = out.prompt_logprobs


async def collect(client: GenerateClient, jobs: list[Job], group: int = 1
                  ) -> list[Collected]:
    """Runs jobs to the end (the non-streaming responses); `group` as in `start_all`."""
    gens = await start_all(client, jobs, group)
    results = [Collected(num_prompt_tokens=g.num_prompt_tokens) for g in gens]
    try:
        async with aclosing(merged(gens)) as outs:
            async for i, out in outs:
                results[i].add(out)
    finally:
        await close_all(gens)
    return results


async def close_all(gens: list[Generation]) -> None:
    for g in gens:
        await g.aclose()


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Runs `work`, cancelling it if the client goes away first (its streams then close).

    Streaming responses need none of this: Starlette (or the Serve proxy) stops them.
    """
    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await watch
    if not task.done():
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise APIError("the client disconnected", status=499)
    return task.result()

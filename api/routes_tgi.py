"""TGI-compatible routes: /generate, /generate_stream, / (either, by `stream`), /info, /tokenize.

Stream events are `data:{json}` lines, one per generated token; the last carries
`generated_text` and `details`. A failure after the stream started is one
`data:{"error": ..., "error_type": "generation"}` event, then the stream ends.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import APIRouter, Request

from api import protocol_tgi as tgi
from api.choices import choice_jobs
from api.context import ServerContext, new_id
from api.errors import tgi_body
from api.generation import Generation, collect, start, unless_disconnected
from api.sse import EventStream, event, guarded
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


def tgi_router(ctx: ServerContext) -> APIRouter:
    router = APIRouter()

    async def generate_once(req: tgi.GenerateRequest, request: Request) -> dict:
        ids, params = tgi.prepare(ctx, req, stream=False)
        k = req.parameters.best_of or 1
        jobs = choice_jobs([(ids, params, new_id("tgi"))], k)
        candidates = await unless_disconnected(request, collect(ctx.client, jobs, k))
        return tgi.generate_response(ctx, req, params, candidates, ids)

    async def generate_stream_once(req: tgi.GenerateRequest) -> EventStream:
        ids, params = tgi.prepare(ctx, req, stream=True)
        gen = await start(ctx.client, ids, params, new_id("tgi"))
        return EventStream(_guarded(_stream_events(ctx, req, params, gen)), [gen])

    @router.get("/info")
    async def info() -> dict:
        return tgi.info(ctx)

    @router.post("/tokenize")
    async def tokenize(req: tgi.TokenizeRequest) -> list[dict]:
        return tgi.tokenize(ctx, req)

    @router.post("/generate")
    async def generate(req: tgi.GenerateRequest, request: Request) -> dict:
        return await generate_once(req, request)

    @router.post("/generate_stream")
    async def generate_stream(req: tgi.GenerateRequest) -> EventStream:
        return await generate_stream_once(req)

    @router.post("/")
    async def compat(req: tgi.GenerateRequest, request: Request):
        if req.stream:
            return await generate_stream_once(req)
        # As TGI does for Inference API compatibility: a list of one generation.
        return [await generate_once(req, request)]

    return router


def _guarded(events: AsyncIterator[str]) -> AsyncIterator[str]:
    return guarded(events, lambda e: event(tgi_body(e), sep=""))


async def _stream_events(ctx: ServerContext, req: tgi.GenerateRequest, params: SamplingParams,
                         gen: Generation) -> AsyncIterator[str]:
    index, text = 0, ""
    async with aclosing(gen.outputs()) as outs:
        async for out in outs:
            text += out.new_text
            for j in range(len(out.new_token_ids)):
                index += 1
                yield event(_token_event(ctx, req, params, gen, out, j, index, text), sep="")


def _token_event(ctx: ServerContext, req: tgi.GenerateRequest, params: SamplingParams,
                 gen: Generation, out: RequestOutput, j: int, index: int, text: str) -> dict:
    """The event for token j of this step; `text` is everything generated so far."""
    n = len(out.new_token_ids)
    token_id = out.new_token_ids[j]
    lp = out.new_logprobs[j] if j < len(out.new_logprobs) else None
    tok = tgi.token(ctx, token_id, out.new_text if j == n - 1 else "",
                    lp.logprob if lp else None)
    top = tgi.top_tokens(ctx, lp.top) if lp and req.parameters.top_n_tokens else []
    if not (out.finished and j == n - 1):
        return tgi.stream_event(index, tok, top, None, None)
    details = {"finish_reason": tgi.finish_reason(ctx, out.finish_reason, token_id, params),
               "generated_tokens": index, "seed": params.seed,
               "input_length": gen.num_prompt_tokens}
    return tgi.stream_event(index, tok, top, tgi.full_text(req, text), details)

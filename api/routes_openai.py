"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions (+ SSE streams).

Streams are `data: {json}` chunks ending with `data: [DONE]`; a failure after the stream has
started is sent as one `data: {"error": {...}}` event before `[DONE]`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import APIRouter, Request

from api import protocol_openai as oai
from api import responses_openai as res
from api.choices import choice_jobs
from api.context import ServerContext, new_id
from api.errors import APIError, GenerationError, openai_body
from api.generation import Generation, Job, collect, merged, start_all, unless_disconnected
from api.sse import EventStream, event, guarded

log = logging.getLogger(__name__)


def _jobs(ctx: ServerContext, prompts: list[list[int]], req: oai._Common, rid: str,
          max_tokens: int | None, logprobs: int | None,
          prompt_logprobs: int | None = None) -> list[Job]:
    """One engine request per candidate of each prompt (api/choices.py), prompt-major; each
    must fit the model with its max_tokens."""
    chat = isinstance(req, oai.ChatCompletionRequest)
    param = "messages" if chat else "prompt"
    limit_name = ("max_completion_tokens" if chat and req.max_completion_tokens
                  else "max_tokens")
    jobs = []
    for i, ids in enumerate(prompts):
        if chat and req.max_completion_tokens and req.max_tokens is not None:
            # max_completion_tokens wins, but a max_tokens that cannot fit is still refused,
            # as the schema bounds both
            ctx.check_length(len(ids), req.max_tokens, param, "max_tokens")
        n = ctx.check_length(len(ids), max_tokens, param, limit_name)
        jobs.append((ids, req.sampling_params(n, logprobs, prompt_logprobs),
                     rid if len(prompts) == 1 else f"{rid}-{i}"))
    return choice_jobs(jobs, req.num_candidates)


def openai_router(ctx: ServerContext) -> APIRouter:
    router = APIRouter(prefix="/v1")

    @router.get("/models")
    async def models() -> dict:
        return {"object": "list", "data": [res.model_card(ctx)]}

    @router.get("/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        if model_id != ctx.model_name:
            raise APIError(f"the model `{model_id}` does not exist", "model",
                           "model_not_found", status=404)
        return res.model_card(ctx)

    @router.post("/completions")
    async def completions(req: oai.CompletionRequest, request: Request):
        req.check(ctx)
        rid, created = new_id("cmpl"), int(time.time())
        prompts = req.prompts(ctx)
        jobs = _jobs(ctx, prompts, req, rid, req.max_tokens, req.engine_logprobs,
                     req.prompt_logprobs)
        k = req.num_candidates
        if not req.stream:
            results = await unless_disconnected(request, collect(ctx.client, jobs, k))
            return res.completion_response(ctx, rid, created, results, req, prompts)
        gens = await start_all(ctx.client, jobs, k)
        return EventStream(_guarded(_completion_events(ctx, rid, created, gens, req, prompts)),
                           gens)

    @router.post("/chat/completions")
    async def chat(req: oai.ChatCompletionRequest, request: Request):
        req.check(ctx)
        rid, created = new_id("chatcmpl"), int(time.time())
        ids = ctx.chat_ids([m.as_template_input() for m in req.messages])
        jobs = _jobs(ctx, [ids], req, rid, req.requested_max_tokens, req.engine_logprobs)
        n = req.num_choices
        if not req.stream:
            results = await unless_disconnected(request, collect(ctx.client, jobs, n))
            return res.chat_response(ctx, rid, created, results, req)
        gens = await start_all(ctx.client, jobs, n)
        return EventStream(_guarded(_chat_events(ctx, rid, created, gens, req)), gens)

    return router


async def _completion_events(ctx: ServerContext, rid: str, created: int,
                             gens: list[Generation], req: oai.CompletionRequest,
                             prompts: list[list[int]]) -> AsyncIterator[str]:
    """Generation i is choice i (prompt i // n); a stream never has more candidates than n."""
    n = req.num_choices
    offsets = [0] * len(gens)
    generated = [0] * len(gens)
    with_usage = req.include_usage
    echo = req.echo_texts(ctx, prompts) if req.echo else None
    echoed = [False] * len(gens)
    zero = req.max_tokens == 0  # echo only: the one token the engine sampled is dropped
    async with aclosing(merged(gens)) as outs:
        async for i, out in outs:
            if echo is not None and not echoed[i]:
                # The prompt goes first, in a chunk of its own (with its logprobs).
                echoed[i], lp = True, None
                if req.logprobs is not None:
                    if out.prompt_logprobs is None:
                        raise GenerationError("the engine sent no prompt logprobs")
                    lp = res.prompt_logprobs(ctx, prompts[i // n], out.prompt_logprobs)
                offsets[i] = len(echo[i // n])
                choice = res.completion_choice(i, echo[i // n], lp, "length" if zero else None)
                yield event(res.completion_object(rid, created, ctx.model_name, [choice], None,
                                                  with_usage))
            if zero:
                continue
            generated[i] += len(out.new_token_ids)
            lp = None
            if req.logprobs is not None:
                texts = [""] * (len(out.new_token_ids) - 1) + [out.new_text]
                lp = res.completion_logprobs(ctx, out.new_logprobs, texts, offsets[i])
            offsets[i] += len(out.new_text)
            if not out.new_text and lp is None and not out.finished:
                continue  # text held back (partial character, possible stop string)
            choice = res.completion_choice(i, out.new_text, lp,
                                           out.finish_reason if out.finished else None)
            yield event(res.completion_object(rid, created, ctx.model_name, [choice], None,
                                              with_usage))
    if with_usage:  # each prompt once, as in the whole response
        total = res.usage(sum(g.num_prompt_tokens for g in gens[::n]), sum(generated))
        yield event(res.completion_object(rid, created, ctx.model_name, [], total))


async def _chat_events(ctx: ServerContext, rid: str, created: int, gens: list[Generation],
                       req: oai.ChatCompletionRequest) -> AsyncIterator[str]:
    """One chunk per choice and step, each with its choice's index; the role first, for each."""
    with_usage = req.include_usage

    def chunk(choices: list[dict], usage: dict | None = None) -> str:
        return event(res.chat_chunk(rid, created, ctx.model_name, choices, usage, with_usage))

    for i in range(len(gens)):
        yield chunk([res.chat_choice(i, {"role": "assistant", "content": ""})])
    generated = 0
    async with aclosing(merged(gens)) as outs:
        async for i, out in outs:
            generated += len(out.new_token_ids)
            lp = (res.chat_logprobs(ctx, out.new_logprobs, req.top_logprobs or 0)
                  if req.logprobs else None)
            if not out.new_text and lp is None and not out.finished:
                continue
            delta = {"content": out.new_text} if out.new_text else {}
            yield chunk([res.chat_choice(i, delta, lp,
                                         out.finish_reason if out.finished else None)])
    if with_usage:
        yield chunk([], res.usage(gens[0].num_prompt_tokens, generated))


def _guarded(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """OpenAI streams end with [DONE], after an error event too."""
    return guarded(events, lambda e: event(openai_body(e)), event("[DONE]"))

"""OpenAI-compatible response bodies and stream chunks (/v1/completions, /v1/chat/completions,
/v1/models), with the shapes of the OpenAI API reference."""

from __future__ import annotations

from typing import Any

from api.choices import best
from api.context import ServerContext
from api.errors import GenerationError
from api.generation import Collected
from api.protocol_openai import ChatCompletionRequest, CompletionRequest
from engine.outputs import TokenLogprob


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(ctx: ServerContext, lps: list[TokenLogprob], texts: list[str],
                        offset: int) -> dict[str, list]:
    """Completions-style logprobs; `offset` is where the first token's text starts."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                            "text_offset": []}
    for lp, text in zip(lps, texts):
        out["tokens"].append(ctx.token_text(lp.token_id))
        out["token_logprobs"].append(lp.logprob)
        top = {ctx.token_text(t): v for t, v in lp.top}
        top.setdefault(ctx.token_text(lp.token_id), lp.logprob)  # the chosen token is listed
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def prompt_logprobs(ctx: ServerContext, ids: list[int],
                    lps: list[TokenLogprob | None]) -> dict[str, list]:
    """The echoed prompt's part of a completion's logprobs: the first token has none (null)."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                            "text_offset": []}
    offset = 0
    for t, lp in zip(ids, lps, strict=True):
        text = ctx.token_text(t)
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        offset += len(text)
        if lp is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(lp.logprob)
        top = {ctx.token_text(i): v for i, v in lp.top}
        top.setdefault(text, lp.logprob)
        out["top_logprobs"].append(top)
    return out


def join_logprobs(a: dict[str, list], b: dict[str, list]) -> dict[str, list]:
    return {k: a[k] + b[k] for k in a}


def _api_object(name: str, rid: str, created: int, model: str, choices: list[dict],
                usage_: dict | None, with_usage: bool) -> dict[str, Any]:
    obj = {"id": rid, "object": name, "created": created, "model": model, "choices": choices}
    if with_usage:
        obj["usage"] = usage_
    return obj


def completion_object(rid: str, created: int, model: str, choices: list[dict],
                      usage_: dict | None = None, with_usage: bool = True) -> dict[str, Any]:
    """A whole completion or one stream chunk: completions use one object name for both."""
    return _api_object("text_completion", rid, created, model, choices, usage_, with_usage)


def completion_choice(index: int, text: str, logprobs: dict | None,
                      finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_response(ctx: ServerContext, rid: str, created: int, results: list[Collected],
                        req: CompletionRequest, prompts: list[list[int]]) -> dict[str, Any]:
    """`results` holds each prompt's candidates in turn; its choices are the best n of them
    (all, in order, without best_of), at index prompt * n + choice, as OpenAI numbers them."""
    k, n = req.num_candidates, req.num_choices
    echoed = req.echo_texts(ctx, prompts) if req.echo else [""] * len(prompts)
    choices = []
    for p, ids in enumerate(prompts):
        candidates = results[p * k:(p + 1) * k]
        picked = best(candidates, n) if k > n else range(n)
        for j, c in enumerate(picked):
            choices.append(_completion_choice(ctx, p * n + j, candidates[c], req, echoed[p], ids))
    # The prompt counts once per prompt, however many choices share it (as OpenAI counts);
    # the completion tokens are all that was generated, best_of's losing candidates included.
    total = usage(sum(r.num_prompt_tokens for r in results[::k]),
                  0 if req.max_tokens == 0 else sum(len(r.token_ids) for r in results))
    return completion_object(rid, created, ctx.model_name, choices, total)


def _completion_choice(ctx: ServerContext, index: int, r: Collected, req: CompletionRequest,
                       echoed: str, prompt: list[int]) -> dict[str, Any]:
    if req.max_tokens == 0:  # the one token the engine sampled is not the client's
        r = Collected(num_prompt_tokens=r.num_prompt_tokens, finish_reason="length",
                      prompt_logprobs=r.prompt_logprobs)
    lp = None
    if req.logprobs is not None:
        lp = completion_logprobs(ctx, r.logprobs, r.token_texts, len(echoed))
        if req.echo:
            if r.prompt_logprobs is None:
                raise GenerationError("the engine sent no prompt logprobs")
            lp = join_logprobs(prompt_logprobs(ctx, prompt, r.prompt_logprobs), lp)
    return completion_choice(index, echoed + r.text, lp, r.finish_reason)


def chat_logprobs(ctx: ServerContext, lps: list[TokenLogprob], top_n: int) -> dict[str, list]:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = ctx.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(lp.token_id, lp.logprob),
                         "top_logprobs": [entry(t, v) for t, v in lp.top[:top_n]]}
                        for lp in lps]}


def chat_response(ctx: ServerContext, rid: str, created: int, results: list[Collected],
                  req: ChatCompletionRequest) -> dict[str, Any]:
    choices = []
    for i, r in enumerate(results):
        logprobs = chat_logprobs(ctx, r.logprobs, req.top_logprobs or 0) if req.logprobs else None
        choices.append({"index": i, "message": {"role": "assistant", "content": r.text},
                        "logprobs": logprobs, "finish_reason": r.finish_reason})
    # One prompt, counted once; every choice's tokens.
    total = usage(results[0].num_prompt_tokens, sum(len(r.token_ids) for r in results))
    return {"id": rid, "object": "chat.completion", "created": created, "model": ctx.model_name,
            "choices": choices, "usage": total}


def chat_chunk(rid: str, created: int, model: str, choices: list[dict],
               usage_: dict | None = None, with_usage: bool = False) -> dict[str, Any]:
    return _api_object("chat.completion.chunk", rid, created, model, choices, usage_, with_usage)


def chat_choice(index: int, delta: dict[str, str], logprobs: dict | None = None,
                finish_reason: str | None = None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def model_card(ctx: ServerContext) -> dict[str, Any]:
    return {"id": ctx.model_name, "object": "model", "created": ctx.created,
            "owned_by": "pdserve", "root": ctx.model_name, "parent": None,
            "max_model_len": ctx.max_model_len}

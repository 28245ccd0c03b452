"""OpenAI-compatible request models and response builders (/v1/completions, /v1/chat/completions).

Shapes follow the OpenAI API reference; `top_k`, `ignore_eos`, `repetition_penalty` and
`stop_token_ids` are extensions with vLLM's names. Unsupported features are refused with a 400
naming the parameter rather than silently ignored.

Types are strict (`"seed": true` or `"max_tokens": "5"` are refused, not coerced) and the
constraints checked in code are also written into the JSON schema (`json_schema_extra`), so
that /openapi.json states what the server accepts.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator

from api.chat_messages import ChatMessage
from api.context import ServerContext
from api.errors import APIError, GenerationError
from api.generation import Collected
from api.unicode_check import valid_unicode
from engine.outputs import TokenLogprob
from engine.sampling_params import SamplingParams


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    _unicode = field_validator("*")(valid_unicode)


_Stop = Annotated[str, Field(json_schema_extra={"minLength": 1})]  # "" is refused by the engine


class StreamOptions(_Model):
    include_usage: bool = False


class _Common(_Model):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # -1 or 0: off
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: _Stop | list[_Stop] | None = None
    stop_token_ids: list[StrictInt] | None = None
    seed: int | None = Field(None, ge=0)
    # Only 0 (refused otherwise, by check()); the schema says so.
    presence_penalty: float = Field(0.0, json_schema_extra={"enum": [0]})
    frequency_penalty: float = Field(0.0, json_schema_extra={"enum": [0]})
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool = False
    logit_bias: dict[str, float] | None = Field(None, json_schema_extra={"maxProperties": 0})
    user: str | None = None

    def check(self, ctx: ServerContext) -> None:
        ctx.check_model(self.model)
        if self.n != 1:
            raise APIError(f"only n=1 is supported, got n={self.n}", "n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise APIError(f"{name} is not supported (only 0); use repetition_penalty",
                               name)
        if self.logit_bias:
            raise APIError("logit_bias is not supported", "logit_bias")
        if self.stream_options is not None and not self.stream:
            raise APIError("stream_options is only allowed with stream=true", "stream_options")
        ctx.check_stop(self.stop_list)
        ctx.check_ids(self.stop_token_ids or [], "stop_token_ids", empty_ok=True)

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling_params(self, max_tokens: int, logprobs: int | None,
                        prompt_logprobs: int | None = None) -> SamplingParams:
        stop = self.stop_list
        try:
            return SamplingParams(
                # max_tokens 0 (echo only) still samples one token, which the response drops:
                # the prefill that scores the prompt samples one anyway.
                max_tokens=max(max_tokens, 1), prompt_logprobs=prompt_logprobs,
                temperature=1.0 if self.temperature is None else self.temperature,
                top_k=max(self.top_k or 0, 0),
                top_p=1.0 if self.top_p is None else self.top_p,
                repetition_penalty=self.repetition_penalty or 1.0,
                seed=self.seed, stop=stop, stop_token_ids=list(self.stop_token_ids or []),
                ignore_eos=self.ignore_eos, logprobs=logprobs)
        except ValueError as e:
            raise APIError(str(e)) from None


# Empty prompts are refused in prompts() (with a clearer message than pydantic's); the schema
# states it.
_Text = Annotated[str, Field(json_schema_extra={"minLength": 1})]
_Ids = Annotated[list[StrictInt], Field(json_schema_extra={"minItems": 1,
                                                           "items": {"minimum": 0}})]
_Many = {"minItems": 1}
PromptInput = (_Text | Annotated[list[_Text], Field(json_schema_extra=_Many)] | _Ids
               | Annotated[list[_Ids], Field(json_schema_extra=_Many)])


# max_tokens 0 only with echo (scoring a prompt without generating), as check() enforces.
_ZERO_NEEDS_ECHO = {"if": {"properties": {"max_tokens": {"const": 0}}, "required": ["max_tokens"]},
                    "then": {"properties": {"echo": {"const": True}}, "required": ["echo"]}}


class CompletionRequest(_Common):
    model_config = ConfigDict(json_schema_extra=_ZERO_NEEDS_ECHO)

    prompt: PromptInput
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=20)
    # The prompt first in each choice's text; with logprobs, its tokens first in `logprobs`
    # (the first token's logprob and top_logprobs null, as OpenAI answers).
    echo: bool = False
    suffix: str | None = Field(None, json_schema_extra={"maxLength": 0})
    best_of: int | None = None

    def check(self, ctx: ServerContext) -> None:
        super().check(ctx)
        if self.max_tokens == 0 and not self.echo:
            raise APIError("max_tokens=0 is only allowed with echo=true", "max_tokens")
        if self.suffix:
            raise APIError("suffix is not supported", "suffix")
        if self.best_of not in (None, 1):
            raise APIError(f"only best_of=1 is supported, got {self.best_of}", "best_of")

    def prompts(self, ctx: ServerContext) -> list[list[int]]:
        """Token ids of each prompt (a request may carry a batch of them)."""
        p = self.prompt
        if isinstance(p, str):
            return [ctx.encode(p)]
        if not p:
            raise APIError("the prompt is empty", "prompt")
        limit = ctx.limits.max_client_batch_size
        if not isinstance(p[0], int) and len(p) > limit:
            raise APIError(f"at most {limit} prompts per request, got {len(p)}", "prompt")
        if isinstance(p[0], str):
            return [ctx.encode(s) for s in p]  # type: ignore[arg-type]
        if isinstance(p[0], int):
            return [ctx.check_ids(p)]  # type: ignore[arg-type]
        return [ctx.check_ids(ids) for ids in p]  # type: ignore[arg-type]

    @property
    def prompt_logprobs(self) -> int | None:
        return self.logprobs if self.echo else None

    def echo_texts(self, ctx: ServerContext, prompts: list[list[int]]) -> list[str]:
        """Each prompt's text as echoed: as sent, or decoded when sent as token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if isinstance(p[0], str):
            return list(p)  # type: ignore[arg-type]
        return [ctx.tokenizer.decode(ids) for ids in prompts]


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Any] | None = Field(None, json_schema_extra={"maxItems": 0})
    response_format: dict[str, Any] | None = None

    def check(self, ctx: ServerContext) -> None:
        super().check(ctx)
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError("top_logprobs requires logprobs=true", "top_logprobs")
        if self.tools:
            raise APIError("tools are not supported", "tools")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise APIError("only response_format type 'text' is supported", "response_format")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def engine_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


# -- responses --------------------------------------------------------------------------------
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


def completion_object(rid: str, created: int, model: str, choices: list[dict],
                      usage_: dict | None = None, with_usage: bool = True) -> dict[str, Any]:
    """A whole completion or one stream chunk: completions use one object name for both."""
    obj = {"id": rid, "object": "text_completion", "created": created, "model": model,
           "choices": choices}
    if with_usage:
        obj["usage"] = usage_
    return obj


def completion_choice(index: int, text: str, logprobs: dict | None,
                      finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_response(ctx: ServerContext, rid: str, created: int, results: list[Collected],
                        req: CompletionRequest, prompts: list[list[int]]) -> dict[str, Any]:
    want_logprobs = req.logprobs is not None
    echoed = req.echo_texts(ctx, prompts) if req.echo else [""] * len(results)
    choices = []
    for i, r in enumerate(results):
        if req.max_tokens == 0:  # the one token the engine sampled is not the client's
            r = Collected(num_prompt_tokens=r.num_prompt_tokens, finish_reason="length",
                          prompt_logprobs=r.prompt_logprobs)
        lp = None
        if want_logprobs:
            lp = completion_logprobs(ctx, r.logprobs, r.token_texts, len(echoed[i]))
            if req.echo:
                if r.prompt_logprobs is None:
                    raise GenerationError("the engine sent no prompt logprobs")
                lp = join_logprobs(prompt_logprobs(ctx, prompts[i], r.prompt_logprobs), lp)
        choices.append(completion_choice(i, echoed[i] + r.text, lp, r.finish_reason))
    total = usage(sum(r.num_prompt_tokens for r in results),
                  0 if req.max_tokens == 0 else sum(len(r.token_ids) for r in results))
    return completion_object(rid, created, ctx.model_name, choices, total)


def chat_logprobs(ctx: ServerContext, lps: list[TokenLogprob], top_n: int) -> dict[str, list]:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = ctx.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(lp.token_id, lp.logprob),
                         "top_logprobs": [entry(t, v) for t, v in lp.top[:top_n]]}
                        for lp in lps]}


def chat_response(ctx: ServerContext, rid: str, created: int, result: Collected,
                  req: ChatCompletionRequest) -> dict[str, Any]:
    logprobs = (chat_logprobs(ctx, result.logprobs, req.top_logprobs or 0)
                if req.logprobs else None)
    choice = {"index": 0, "message": {"role": "assistant", "content": result.text},
              "logprobs": logprobs, "finish_reason": result.finish_reason}
    return {"id": rid, "object": "chat.completion", "created": created, "model": ctx.model_name,
            "choices": [choice], "usage": usage(result.num_prompt_tokens, len(result.token_ids))}


def chat_chunk(rid: str, created: int, model: str, choices: list[dict],
               usage_: dict | None = None, with_usage: bool = False) -> dict[str, Any]:
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": choices}
    if with_usage:
        chunk["usage"] = usage_
    return chunk


def chat_choice(delta: dict[str, str], logprobs: dict | None = None,
                finish_reason: str | None = None) -> dict[str, Any]:
    return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def model_card(ctx: ServerContext) -> dict[str, Any]:
    return {"id": ctx.model_name, "object": "model", "created": ctx.created,
            "owned_by": "pdserve", "root": ctx.model_name, "parent": None,
            "max_model_len": ctx.max_model_len}

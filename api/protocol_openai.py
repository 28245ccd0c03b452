"""OpenAI-compatible request models (/v1/completions, /v1/chat/completions); the responses are
built in api/responses_openai.py.

Shapes follow the OpenAI API reference; `top_k`, `ignore_eos`, `repetition_penalty` and
`stop_token_ids` are extensions with vLLM's names. Unsupported features are refused with a 400
naming the parameter rather than silently ignored.

Types are strict (`"seed": true` or `"max_tokens": "5"` are refused, not coerced) and the
constraints checked in code are also written into the JSON schema (`json_schema_extra`), so
that /openapi.json states what the server accepts.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from api.chat_messages import ChatMessage
from api.choices import MAX_CHOICES
from api.context import ServerContext
from api.errors import APIError
from api.json_int import integral_numbers
from api.unicode_check import valid_unicode
from engine.sampling_params import SamplingParams


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    _unicode = field_validator("*")(valid_unicode)
    _integers = model_validator(mode="before")(integral_numbers)  # 16.0 is 16 (api/json_int.py)


_Stop = Annotated[str, Field(json_schema_extra={"minLength": 1})]  # "" is refused by the engine


class StreamOptions(_Model):
    include_usage: bool = False


class _Common(_Model):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=100)  # the engine's range
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # -1 or 0: off
    # Checked in check() (a 400 naming `n`); the schema states the range too.
    n: int | None = Field(1, json_schema_extra={"minimum": 1, "maximum": MAX_CHOICES})
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: _Stop | list[_Stop] | None = None
    stop_token_ids: list[StrictInt] | None = None
    seed: int | None = Field(None, ge=0)
    # Only 0 (refused otherwise, by check()); the schema says so.
    presence_penalty: float = Field(0.0, json_schema_extra={"enum": [0]})
    frequency_penalty: float = Field(0.0, json_schema_extra={"enum": [0]})
    repetition_penalty: float | None = Field(None, gt=0, le=10)  # the engine's range
    ignore_eos: bool = False
    logit_bias: dict[str, float] | None = Field(None, json_schema_extra={"maxProperties": 0})
    user: str | None = None

    def check(self, ctx: ServerContext) -> None:
        ctx.check_model(self.model)
        if not 1 <= self.num_choices <= MAX_CHOICES:
            raise APIError(f"n must be between 1 and {MAX_CHOICES}, got n={self.n}", "n")
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
    def num_choices(self) -> int:
        """Choices returned per prompt."""
        return 1 if self.n is None else self.n

    @property
    def num_candidates(self) -> int:
        """Sequences generated per prompt (more than the choices with best_of)."""
        return self.num_choices

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
_Ids = Annotated[list[StrictInt], Field(json_schema_extra={
    "minItems": 1, "items": {"type": "integer", "minimum": 0}})]
_Many = {"minItems": 1}
PromptInput = (_Text | Annotated[list[_Text], Field(json_schema_extra=_Many)] | _Ids
               | Annotated[list[_Ids], Field(json_schema_extra=_Many)])


# stream_options only with stream=true, as check() enforces.
_OPTIONS_NEED_STREAM = {
    "if": {"properties": {"stream_options": {"type": "object"}}, "required": ["stream_options"]},
    "then": {"properties": {"stream": {"const": True}}, "required": ["stream"]}}

# max_tokens 0 only with echo (scoring a prompt without generating), as check() enforces.
_ZERO_NEEDS_ECHO = {"if": {"properties": {"max_tokens": {"const": 0}}, "required": ["max_tokens"]},
                    "then": {"properties": {"echo": {"const": True}}, "required": ["echo"]}}


# n, best_of and stream, as check() enforces them: best_of is absent, or at least n, and with
# stream=true equal to n. JSON Schema cannot compare two fields, so the rule is written out as
# one case per value of n, in a component of its own that api/openapi.py adds and refers to
# from the request's schema: inlined, its 32 cases times every other property of the request
# outgrow what schema-driven tools expand (Schemathesis gave up on the operation).
CHOICE_RULES = "CompletionChoiceRules"


def choice_rules() -> dict[str, Any]:
    def n_is(n: int) -> dict[str, Any]:  # absent or null: 1
        return {"const": n} if n > 1 else {"enum": [1, None]}

    def case(n: int, best_of: dict[str, Any], **more: Any) -> dict[str, Any]:
        return {"properties": {"n": n_is(n), "best_of": best_of, **more},
                "required": ["best_of", "n"] if n > 1 else ["best_of"]}

    return {"anyOf": [
        {"properties": {"best_of": {"type": "null"}}},
        *(case(n, {"const": n}) for n in range(1, MAX_CHOICES + 1)),
        *(case(n, {"type": "integer", "minimum": n + 1}, stream={"const": False})
          for n in range(1, MAX_CHOICES))]}


class CompletionRequest(_Common):
    model_config = ConfigDict(json_schema_extra={  # + CHOICE_RULES, added by api/openapi.py
        **_ZERO_NEEDS_ECHO, "allOf": [_OPTIONS_NEED_STREAM]})

    prompt: PromptInput
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=20)
    # The prompt first in each choice's text; with logprobs, its tokens first in `logprobs`
    # (the first token's logprob and top_logprobs null, as OpenAI answers).
    echo: bool = False
    suffix: str | None = Field(None, json_schema_extra={"maxLength": 0})
    best_of: int | None = Field(None, description=(
        "Candidates generated per prompt; the n with the highest mean token logprob are "
        f"returned. At least n, at most {MAX_CHOICES}; with stream=true, only n."),
        json_schema_extra={"minimum": 1, "maximum": MAX_CHOICES})

    def check(self, ctx: ServerContext) -> None:
        super().check(ctx)
        if self.max_tokens == 0 and not self.echo:
            raise APIError("max_tokens=0 is only allowed with echo=true", "max_tokens")
        if self.suffix:
            raise APIError("suffix is not supported", "suffix")
        if self.best_of is not None:
            if not 1 <= self.best_of <= MAX_CHOICES:
                raise APIError(f"best_of must be between 1 and {MAX_CHOICES}, got "
                               f"best_of={self.best_of}", "best_of")
            if self.best_of < self.num_choices:
                raise APIError(f"best_of must be greater than or equal to n, got "
                               f"best_of={self.best_of} and n={self.num_choices}", "best_of")
            if self.stream and self.best_of > self.num_choices:
                raise APIError("best_of cannot be streamed: with stream=true, best_of must "
                               f"equal n, got best_of={self.best_of} and n={self.num_choices}",
                               "best_of")

    @property
    def num_candidates(self) -> int:
        return self.best_of or self.num_choices

    @property
    def engine_logprobs(self) -> int | None:
        """Logprobs asked of the engine: best_of ranks by them even when the client wants none."""
        if self.logprobs is None and self.num_candidates > self.num_choices:
            return 0
        return self.logprobs

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


# top_logprobs only with logprobs=true, as check() enforces (and as OpenAI documents it).
_TOP_NEEDS_LOGPROBS = {
    "if": {"properties": {"top_logprobs": {"type": "integer"}}, "required": ["top_logprobs"]},
    "then": {"properties": {"logprobs": {"const": True}}, "required": ["logprobs"]}}
_TEXT_FORMAT = {"properties": {"type": {"enum": ["text", None]}}}  # the only format served


class ChatCompletionRequest(_Common):
    model_config = ConfigDict(json_schema_extra={**_TOP_NEEDS_LOGPROBS,
                                                 "allOf": [_OPTIONS_NEED_STREAM]})

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Any] | None = Field(None, json_schema_extra={"maxItems": 0})
    response_format: dict[str, Any] | None = Field(None, json_schema_extra=_TEXT_FORMAT)

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

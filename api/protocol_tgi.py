"""TGI-compatible request models and response builders (/generate, /generate_stream, /info).

Semantics follow text-generation-inference: sampling is on when `do_sample` is true or any of
temperature / top_k / top_p is given (otherwise greedy); a sampled request without a seed gets a
random one, reported in `details.seed`; `truncate` keeps the last N prompt tokens; `max_new_tokens`
defaults to 100; a matched stop sequence stays at the end of `generated_text` (and in its
token's text), as TGI leaves it. `best_of` runs that many sampled sequences (api/choices.py):
the one with the highest mean token logprob is the answer, the others go in
`details.best_of_sequences`; as in TGI it needs sampling, takes no seed (each sequence gets its
own, reported with it) and no stream.

Types are strict (`"return_full_text": 0.0` is refused, not read as false). The ranges are
checked in `_check` with TGI's messages, and written into the JSON schema too.
"""

from __future__ import annotations

import random
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from api.choices import MAX_CHOICES, best, choice_seed
from api.context import ServerContext
from api.errors import APIError, GenerationError
from api.generation import Collected
from api.json_int import integral_numbers
from api.unicode_check import valid_unicode
from engine.sampling_params import SamplingParams

DEFAULT_MAX_NEW_TOKENS = 100
_seeds = random.SystemRandom()


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    _unicode = field_validator("*")(valid_unicode)
    _integers = model_validator(mode="before")(integral_numbers)  # 16.0 is 16 (api/json_int.py)


def _schema(**constraints: Any) -> Any:
    """Schema-only constraints: `_check` enforces them, with TGI's wording."""
    return {"json_schema_extra": constraints}


_Stop = Annotated[str, Field(json_schema_extra={"minLength": 1})]  # "" is refused by the engine

# TGI's best_of rules, for the schema: best_of > 1 needs sampling (do_sample, or one of
# temperature / top_k / top_p given) and no seed.
_BEST_OF_RULES = {
    "if": {"properties": {"best_of": {"type": "integer", "minimum": 2}}, "required": ["best_of"]},
    "then": {"properties": {"seed": {"type": "null"}}, "anyOf": [
        {"properties": {"do_sample": {"const": True}}, "required": ["do_sample"]},
        *({"properties": {k: {"type": "number"}}, "required": [k]}
          for k in ("temperature", "top_k", "top_p"))]}}


class Parameters(_Model):
    model_config = ConfigDict(json_schema_extra=_BEST_OF_RULES)

    best_of: int | None = Field(None, **_schema(minimum=1, maximum=MAX_CHOICES))
    # The upper bounds are the engine's (its message names them).
    temperature: float | None = Field(None, **_schema(exclusiveMinimum=0, maximum=100))
    repetition_penalty: float | None = Field(None, **_schema(exclusiveMinimum=0, maximum=10))
    frequency_penalty: float | None = Field(None, **_schema(enum=[0, None]))
    top_k: int | None = Field(None, **_schema(minimum=1))
    top_p: float | None = Field(None, **_schema(exclusiveMinimum=0, exclusiveMaximum=1))
    typical_p: float | None = Field(None, **_schema(enum=[None]))
    do_sample: bool = False
    max_new_tokens: int | None = Field(DEFAULT_MAX_NEW_TOKENS, **_schema(minimum=1))
    return_full_text: bool | None = None
    stop: list[_Stop] = Field(default_factory=list)
    truncate: int | None = Field(None, **_schema(minimum=1))
    watermark: bool = Field(False, **_schema(enum=[False]))
    details: bool = False
    # The prompt's tokens with their logprobs in `details.prefill` (the first one's null);
    # it turns `details` on, as in TGI, and is refused on streams, as TGI refuses it.
    decoder_input_details: bool = False
    seed: int | None = Field(None, ge=0)
    top_n_tokens: int | None = Field(None, ge=0, le=20)
    grammar: dict[str, Any] | None = Field(None, **_schema(enum=[None]))


class GenerateRequest(_Model):
    inputs: str = Field(**_schema(minLength=1))
    parameters: Parameters = Field(default_factory=Parameters)
    stream: bool = False  # only read by the compat route `/`


class TokenizeParameters(_Model):
    truncate: int | None = Field(None, ge=1)  # keep the last N tokens, as TGI's /tokenize does


class TokenizeRequest(_Model):
    """/tokenize takes a /generate body, as TGI's does, and reads `inputs` and `truncate` only:
    the other parameters change nothing about the tokens, so none of them is refused."""

    inputs: str = Field(**_schema(minLength=1))
    parameters: TokenizeParameters | None = None


def _check(p: Parameters, max_input_tokens: int) -> None:
    def bad(msg: str, param: str) -> None:
        raise APIError(msg, param)

    if p.temperature is not None and p.temperature <= 0:
        bad("`temperature` must be strictly positive", "temperature")
    if p.repetition_penalty is not None and p.repetition_penalty <= 0:
        bad("`repetition_penalty` must be strictly positive", "repetition_penalty")
    if p.top_p is not None and not 0 < p.top_p < 1:
        bad("`top_p` must be > 0.0 and < 1.0", "top_p")
    if p.top_k is not None and p.top_k <= 0:
        bad("`top_k` must be strictly positive", "top_k")
    if p.max_new_tokens is not None and p.max_new_tokens <= 0:
        bad("`max_new_tokens` must be strictly positive", "max_new_tokens")
    if p.truncate is not None and not 0 < p.truncate <= max_input_tokens:
        bad(f"`truncate` must be strictly positive and at most {max_input_tokens}. "
            f"Given: {p.truncate}", "truncate")
    if p.best_of is not None and not 0 < p.best_of <= MAX_CHOICES:
        bad(f"`best_of` must be > 0 and <= {MAX_CHOICES}. Given: {p.best_of}", "best_of")
    if (p.best_of or 1) > 1 and not _sampling(p):
        bad("you must use sampling when `best_of` is > 1", "best_of")
    if (p.best_of or 1) > 1 and p.seed is not None:
        bad("`seed` must not be set when `best_of` > 1", "seed")
    if p.frequency_penalty:
        bad("`frequency_penalty` is not supported; use `repetition_penalty`", "frequency_penalty")
    if p.typical_p is not None:
        bad("`typical_p` is not supported", "typical_p")
    if p.watermark:
        bad("`watermark` is not supported", "watermark")
    if p.grammar is not None:
        bad("`grammar` is not supported", "grammar")


def _sampling(p: Parameters) -> bool:
    return p.do_sample or any(v is not None for v in (p.temperature, p.top_k, p.top_p))


def prepare(ctx: ServerContext, req: GenerateRequest, stream: bool,
            ) -> tuple[list[int], SamplingParams]:
    """Prompt ids and engine parameters for a TGI request (each best_of sequence's: see
    api/choices.py for their seeds); raises APIError on bad input."""
    p = req.parameters
    if stream and p.best_of not in (None, 1):  # checked first, as TGI's stream route does
        raise APIError("`best_of` != 1 is not supported when streaming tokens", "best_of")
    _check(p, ctx.limits.max_input_tokens)
    ctx.check_stop(p.stop)
    if not req.inputs:
        raise APIError("`inputs` cannot be empty", "inputs")
    ids = ctx.encode(req.inputs, "inputs")
    if p.truncate is not None:
        ids = ids[-p.truncate:]
    max_new = ctx.check_length(len(ids), p.max_new_tokens, "inputs", "max_new_tokens")
    if p.decoder_input_details and stream:
        raise APIError("`decoder_input_details` == true is not supported when streaming tokens",
                       "decoder_input_details")
    sampling = _sampling(p)
    seed = (p.seed if p.seed is not None else _seeds.getrandbits(63)) if sampling else None
    details = p.details or p.decoder_input_details
    # best_of ranks its sequences by their logprobs
    wanted = stream or details or (p.best_of or 1) > 1
    logprobs = p.top_n_tokens if p.top_n_tokens else (0 if wanted else None)
    try:
        params = SamplingParams(
            max_tokens=max_new, temperature=(p.temperature or 1.0) if sampling else 0.0,
            top_k=p.top_k or 0, top_p=p.top_p or 1.0,
            repetition_penalty=p.repetition_penalty or 1.0, seed=seed, stop=list(p.stop),
            include_stop_str_in_output=True, logprobs=logprobs,
            prompt_logprobs=0 if p.decoder_input_details else None)
    except ValueError as e:
        raise APIError(str(e)) from None
    return ids, params


# -- responses --------------------------------------------------------------------------------
def finish_reason(ctx: ServerContext, reason: str | None, last_token: int | None,
                  params: SamplingParams) -> str:
    if reason == "length":
        return "length"
    # The engine says "stop" for both; a special (EOS) token or a stop token id ends with the
    # token itself, a stop string with text.
    if last_token is not None and (ctx.is_special(last_token)
                                   or last_token in params.stop_token_ids):
        return "eos_token"
    return "stop_sequence"


def token(ctx: ServerContext, token_id: int, text: str, logprob: float | None) -> dict[str, Any]:
    return {"id": token_id, "text": text, "logprob": logprob, "special": ctx.is_special(token_id)}


def top_tokens(ctx: ServerContext, top: list[tuple[int, float]]) -> list[dict[str, Any]]:
    return [token(ctx, t, ctx.token_text(t), v) for t, v in top]


def full_text(req: GenerateRequest, generated: str) -> str:
    return req.inputs + generated if req.parameters.return_full_text else generated


def prefill_tokens(ctx: ServerContext, ids: list[int], r: Collected) -> list[dict[str, Any]]:
    """TGI's `details.prefill`: `{id, text, logprob}` per prompt token, the first logprob null."""
    if r.prompt_logprobs is None:
        raise GenerationError("the engine sent no prompt logprobs")
    return [{"id": t, "text": ctx.token_text(t), "logprob": lp.logprob if lp else None}
            for t, lp in zip(ids, r.prompt_logprobs, strict=True)]


def generate_response(ctx: ServerContext, req: GenerateRequest, params: SamplingParams,
                      candidates: list[Collected], ids: list[int]) -> dict[str, Any]:
    """The best candidate's answer (there is one unless best_of > 1); with details, the others
    in `details.best_of_sequences`, in the order they were generated."""
    [top] = best(candidates, 1) if len(candidates) > 1 else [0]
    body: dict[str, Any] = {"generated_text": full_text(req, candidates[top].text)}
    if req.parameters.details or req.parameters.decoder_input_details:
        details = _sequence(ctx, req, params, candidates[top], ids, choice_seed(params.seed, top))
        del details["generated_text"]
        if len(candidates) > 1:
            details["best_of_sequences"] = [
                _sequence(ctx, req, params, r, ids, choice_seed(params.seed, i))
                for i, r in enumerate(candidates) if i != top]
        body["details"] = details
    return body


def _sequence(ctx: ServerContext, req: GenerateRequest, params: SamplingParams, r: Collected,
              ids: list[int], seed: int | None) -> dict[str, Any]:
    """One sequence's details, with its text: a `best_of_sequences` entry as TGI writes it."""
    last = r.token_ids[-1] if r.token_ids else None
    lps = r.logprobs or [None] * len(r.token_ids)
    out: dict[str, Any] = {
        "generated_text": full_text(req, r.text),
        "finish_reason": finish_reason(ctx, r.finish_reason, last, params),
        "generated_tokens": len(r.token_ids),
        "seed": seed,
        "prefill": prefill_tokens(ctx, ids, r) if req.parameters.decoder_input_details else [],
        "tokens": [token(ctx, t, text, lp.logprob if lp else None)
                   for t, text, lp in zip(r.token_ids, r.token_texts, lps)],
    }
    if req.parameters.top_n_tokens:
        out["top_tokens"] = [top_tokens(ctx, lp.top) for lp in r.logprobs]
    return out


def stream_event(index: int, tok: dict[str, Any], top: list[dict[str, Any]],
                 generated_text: str | None, details: dict[str, Any] | None) -> dict[str, Any]:
    return {"index": index, "token": tok, "top_tokens": top, "generated_text": generated_text,
            "details": details}


def tokenize(ctx: ServerContext, req: TokenizeRequest) -> list[dict[str, Any]]:
    """TGI's /tokenize: the prompt's tokens as `{id, text, start, stop}`, where start/stop are
    character offsets into `inputs` (special tokens added by the tokenizer span nothing); with
    `truncate`, the last N of them."""
    if not req.inputs:
        raise APIError("`inputs` cannot be empty", "inputs")
    try:
        enc = ctx.tokenizer(req.inputs, return_offsets_mapping=True)
    except Exception as e:  # slow tokenizers have no offsets; odd text is the client's
        raise APIError(f"cannot tokenize the input: {e}", "inputs") from None
    tokens = [{"id": t, "text": req.inputs[a:b], "start": a, "stop": b}
              for t, (a, b) in zip(enc["input_ids"], enc["offset_mapping"])]
    truncate = req.parameters.truncate if req.parameters else None
    return tokens[-truncate:] if truncate else tokens


def info(ctx: ServerContext) -> dict[str, Any]:
    lim = ctx.limits
    return {
        "model_id": ctx.model_name, "model_sha": None, "model_pipeline_tag": "text-generation",
        "max_concurrent_requests": lim.max_concurrent_requests, "max_best_of": MAX_CHOICES,
        "max_stop_sequences": lim.max_stop_sequences, "max_input_tokens": lim.max_input_tokens,
        "max_input_length": lim.max_input_tokens, "max_total_tokens": lim.max_total_tokens,
        "max_client_batch_size": 1,
        "validation_workers": 1, "router": "pdserve", "version": "0.1.0", "sha": None,
        "docker_label": None,
    }

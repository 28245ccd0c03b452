"""gRPC messages (api/proto/pdserve.proto) to engine inputs and back.

Requests go through the same checks as the HTTP routes (ServerContext: tokenization, ids in the
vocabulary, stop-sequence count, prompt + output length; SamplingParams' own ranges), so a
request that HTTP would refuse is refused here with the same message. Stop strings are cut from
the text, as on the OpenAI routes.

`unset` fields in proto3 read as zero, so the parameters whose zero means something (a
temperature of 0 is greedy) are `optional` in the .proto and read here with HasField.
"""

from __future__ import annotations

from api.context import ServerContext
from api.errors import APIError
from api.generation import Collected
from api.proto import pdserve_pb2 as pb
from engine.outputs import RequestOutput, TokenLogprob
from engine.sampling_params import SamplingParams

DEFAULT_MAX_NEW_TOKENS = 16  # as /v1/completions
FINISH_REASONS = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}


def prepare(ctx: ServerContext, req: pb.GenerateRequest) -> tuple[list[int], SamplingParams]:
    """Prompt ids and engine parameters; raises APIError (param named) on bad input."""
    ctx.check_model(req.model or None)  # proto3: unset is ""
    if req.text and req.token_ids:
        raise APIError("give either `text` or `token_ids`, not both", "text")
    if req.token_ids:
        ids = ctx.check_ids(list(req.token_ids), "token_ids")
    else:
        ids = ctx.encode(req.text, "text")  # refuses an empty prompt
    p = req.parameters
    ctx.check_stop(list(p.stop), "parameters.stop")
    ctx.check_ids(list(p.stop_token_ids), "parameters.stop_token_ids", empty_ok=True)
    if p.HasField("max_new_tokens") and p.max_new_tokens < 1:
        raise APIError("`max_new_tokens` must be at least 1", "parameters.max_new_tokens")
    requested = p.max_new_tokens if p.HasField("max_new_tokens") else DEFAULT_MAX_NEW_TOKENS
    max_new = ctx.check_length(len(ids), requested, "text" if req.text else "token_ids",
                               "max_new_tokens")

    def given(name: str, default: float) -> float:
        return getattr(p, name) if p.HasField(name) else default

    try:
        params = SamplingParams(
            max_tokens=max_new, temperature=given("temperature", 1.0), top_k=p.top_k,
            top_p=given("top_p", 1.0), repetition_penalty=given("repetition_penalty", 1.0),
            seed=p.seed if p.HasField("seed") else None, stop=list(p.stop),
            stop_token_ids=list(p.stop_token_ids), ignore_eos=p.ignore_eos,
            logprobs=p.logprobs if p.HasField("logprobs") else None)
    except ValueError as e:  # the engine's ranges, in its words
        raise APIError(str(e), "parameters") from None
    return ids, params


def finish_reason(reason: str | None) -> int:
    return FINISH_REASONS.get(reason or "", pb.FINISH_REASON_UNSPECIFIED)


def usage(prompt_tokens: int, completion_tokens: int) -> pb.Usage:
    return pb.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                    total_tokens=prompt_tokens + completion_tokens)


def logprobs(ctx: ServerContext, lps: list[TokenLogprob]) -> list[pb.TokenLogprob]:
    return [pb.TokenLogprob(token_id=lp.token_id, text=ctx.token_text(lp.token_id),
                            logprob=lp.logprob,
                            top=[pb.TopLogprob(token_id=t, text=ctx.token_text(t), logprob=v)
                                 for t, v in lp.top])
            for lp in lps]


def response(ctx: ServerContext, rid: str, r: Collected) -> pb.GenerateResponse:
    """The unary answer: the whole generation."""
    return pb.GenerateResponse(
        text=r.text, token_ids=r.token_ids, finish_reason=finish_reason(r.finish_reason),
        usage=usage(r.num_prompt_tokens, len(r.token_ids)), logprobs=logprobs(ctx, r.logprobs),
        request_id=rid)


def stream_message(ctx: ServerContext, rid: str, out: RequestOutput, num_prompt_tokens: int,
                   num_sent: int) -> pb.GenerateResponse:
    """One stream message: this step's tokens; `num_sent` counts every token sent so far,
    these included (usage on the last message)."""
    msg = pb.GenerateResponse(text=out.new_text, token_ids=out.new_token_ids,
                              logprobs=logprobs(ctx, out.new_logprobs), request_id=rid)
    if out.finished:
        msg.finish_reason = finish_reason(out.finish_reason)
        msg.usage.CopyFrom(usage(num_prompt_tokens, num_sent))
    return msg

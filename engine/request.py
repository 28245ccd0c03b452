"""A request's state as plain data: token ids and integer progress counters, no phase flags.

The phase is what the counters say: `num_computed_tokens < num_prompt_tokens` is prefill,
`num_pending_tokens == 1` is a decode step. With overlapped scheduling a launched step counts at
once (`num_computed_tokens` moves at launch) and the token it samples is a placeholder, counted
by `num_output_placeholders`, until its id comes back from the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.sampling_params import SamplingParams


@dataclass(eq=False)  # identity: the scheduler's `in`/`remove` must not compare token lists
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list = field(default_factory=list)  # one TokenLogprob per output token
    # With params.prompt_logprobs: entry p is prompt token p's TokenLogprob (None for p = 0),
    # filled in order as the prompt runs; its length counts the positions done, and survives a
    # preemption, so a recompute only adds what is missing.
    prompt_logprobs: list = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV is in the pool (or written by a launched step)
    # Tokens that launched steps sample but whose ids are not back yet (overlapped scheduling):
    # at most one per launched step; a step that needs one as input reads it on the device.
    num_output_placeholders: int = 0
    num_cached_tokens: int = 0  # tokens found in the prefix cache (stats)
    block_table: list[int] = field(default_factory=list)  # page ids, in token order
    block_hashes: list[int] = field(default_factory=list)  # chain hashes of full blocks
    num_preemptions: int = 0
    # The prefill role: on finishing, hand out the prompt's KV from this block on (then free).
    kv_export_from: int | None = None
    # ... and, when set, layer by layer during its last prompt step (an engine.kv_stream
    # LayerwiseExport; typed loosely because this module stays free of torch).
    kv_stream: object | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, n: int) -> list[int]:
        """all_token_ids[start:start + n] without building the whole list (a hot path: a decode
        step of 128 requests with 1K-token prompts spent ~0.6 ms of host time on those copies)."""
        p = self.num_prompt_tokens
        if start >= p:
            return self.output_token_ids[start - p:start - p + n]
        if start + n <= p:
            return self.prompt_token_ids[start:start + n]
        return self.all_token_ids[start:start + n]

    @property
    def num_planned_tokens(self) -> int:
        """Tokens the request will hold once every launched step is back: known + placeholders."""
        return self.num_tokens + self.num_output_placeholders

    @property
    def num_pending_tokens(self) -> int:
        """Tokens still to run through the model before the next token can be sampled."""
        return self.num_planned_tokens - self.num_computed_tokens

    @property
    def num_prompt_logprobs_missing(self) -> int:
        """Prompt positions whose logprob is still owed (0 when none were asked for)."""
        if self.params.prompt_logprobs is None:
            return 0
        return self.num_prompt_tokens - len(self.prompt_logprobs)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

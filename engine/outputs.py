"""What the engine hands back each step, per request (plain, picklable data)."""

from __future__ import annotations

import operator
from dataclasses import dataclass, field, fields


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # top-n (token_id, logprob)


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    new_text: str  # detokenized delta; never splits a multi-byte character
    finished: bool
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    new_logprobs: list[TokenLogprob] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None  # set when the request failed server-side
    kv: KVExport | None = None  # the prompt's KV, on the finishing output of an export request
    # Only on a request's first output, when params.prompt_logprobs is set: one entry per
    # prompt token, the first None (OpenAI's echo logprobs, TGI's details.prefill).
    prompt_logprobs: list[TokenLogprob | None] | None = None

    def to_wire(self) -> tuple:
        """The fields as a plain tuple, in declaration order: a step's outputs pickle ~3x
        faster as tuples than as dataclasses (their state goes through a dict each)."""
        return _OUTPUT_FIELDS(self)

    @classmethod
    def from_wire(cls, values: tuple) -> RequestOutput:
        return cls(*values)

    def evolve(self, **changes: object) -> RequestOutput:
        """A copy with `changes`, as `dataclasses.replace` makes it, at a fraction of its cost
        (no `__init__`, no walk over the fields): the API makes one per streamed token, and
        `replace` was the largest single item of its per-token profile."""
        if not changes.keys() <= _FIELD_NAMES:
            unknown = sorted(changes.keys() - _FIELD_NAMES)
            raise TypeError(f"RequestOutput has no field(s) {unknown}")
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.__dict__.update(changes)
        return new


@dataclass
class KVExport:
    """A copy of a finished request's prompt KV (the prefill role hands it to a transport)."""

    data: object  # torch.Tensor [num_layers, num_pages, 2, page_size, Hkv, D] on the engine device
    first_block: int  # data holds blocks first_block .. first_block + num_pages - 1
    block_hashes: list[int]  # chain hashes of all the prompt's full blocks


_FIELD_NAMES = frozenset(f.name for f in fields(RequestOutput))
_OUTPUT_FIELDS = operator.attrgetter(*(f.name for f in fields(RequestOutput)))

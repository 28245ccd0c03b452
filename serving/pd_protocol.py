"""What a prefill replica answers a decode replica: the first token (with the prompt's logprobs
when asked for) and a handle to the KV pages.

It lives below both roles so that neither imports the other.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from engine.outputs import TokenLogprob
from engine.sampling_params import SamplingParams


@dataclass
class PrefillResult:
    first_token: int
    logprob: TokenLogprob | None
    kv: object  # transport handle of a KVPayload
    num_cached_tokens: int  # prompt tokens the prefill side found in its own prefix cache
    # With params.prompt_logprobs: one entry per prompt token (the first None), computed where
    # the prompt ran; the decode side never runs the prompt, so they come from here.
    prompt_logprobs: list[TokenLogprob | None] | None = None


class Prefiller(Protocol):
    """A prefill replica as the decode side calls it (a Serve handle adapter, or the worker).

    `prefill` answers once the prompt has run, with a handle to the whole KV. `prefill_stream`
    (for transports that stream layers) yields the KV handle before the prompt runs, then the
    PrefillResult (`kv` None): the decode side receives the layers while they are computed."""

    async def prefill(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
                      first_block: int = 0) -> PrefillResult: ...

    def prefill_stream(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
                       first_block: int = 0) -> AsyncIterator[object | PrefillResult]: ...

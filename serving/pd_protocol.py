"""What a prefill replica answers a decode replica: the first token and a handle to the KV pages.

It lives below both roles so that neither imports the other.
"""

from __future__ import annotations

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


class Prefiller(Protocol):
    """A prefill replica as the decode side calls it (a Serve handle adapter, or the worker)."""

    async def prefill(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
                      first_block: int = 0) -> PrefillResult: ...

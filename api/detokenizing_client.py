"""DetokenizingClient: text and stop strings for any generation client, on the API side.

The serving replicas stream token ids only (`Engine(..., detokenize=False)`): decoding every
token inside the engine step holds the GIL that the step loop needs. This wrapper gives every
output its text instead, for every route, in-process and behind Serve alike.

Per request it keeps one `IncrementalDetokenizer` and feeds it the request's tokens one at a
time, in order, as the engine would have done, so the text is the same whichever way the
tokens were grouped into outputs (one per step, merged when a consumer fell behind, resumed on
another replica after a failure):

- `new_text` is the delta of the output's tokens; at the request's end what the detokenizer
  held back is flushed.
- A stop string that completes at a token before the upstream request finished ends the
  request there: the output is cut after that token (its logprobs with it), marked finished
  with reason "stop", and the upstream iterator is closed, which aborts the request upstream
  and frees its pages. `num_output_tokens` then counts only the tokens the client received.
- A stop string that completes at the token where the upstream request finished anyway (EOS,
  max_tokens) keeps the upstream reason, as the engine does.

Without a tokenizer (dummy weights) outputs pass through unchanged: token ids, no text.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from api.context import GenerateClient
from engine.detokenizer import IncrementalDetokenizer
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams


def detokenize_output(detok: IncrementalDetokenizer, out: RequestOutput) -> RequestOutput:
    """`out` with its text; cut and finished with "stop" if a stop string completes early."""
    ids = out.new_token_ids
    parts: list[str] = []
    for j, tok in enumerate(ids):
        parts.append(detok.push([tok]))
        upstream_done = out.finished and j == len(ids) - 1
        if detok.finished_by_stop and not upstream_done:
            kept = j + 1  # the tokens after the stop string's end never reach the client
            return out.evolve(
                new_token_ids=ids[:kept], new_logprobs=out.new_logprobs[:kept],
                new_text="".join(parts), finished=True, finish_reason="stop",
                num_output_tokens=out.num_output_tokens - (len(ids) - kept), kv=None)
    if out.finished:
        parts.append(detok.flush())  # '' after a stop string: nothing is held then
    return out.evolve(new_text="".join(parts))


class DetokenizingClient:
    """A GenerateClient whose outputs carry text; wraps any GenerateClient."""

    def __init__(self, client: GenerateClient, tokenizer: Any) -> None:
        self.client, self.tokenizer = client, tokenizer

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        stream = self.client.generate(prompt_ids, params, request_id)
        try:
            if self.tokenizer is None:
                async for out in stream:
                    yield out
                return
            detok = IncrementalDetokenizer(self.tokenizer, prompt_ids, params)
            async for out in stream:
                out = detokenize_output(detok, out)
                if out.finished:
                    # Close before handing the last output on: a stop string found here must
                    # free the upstream request's pages now, not when the consumer lets go.
                    await _close(stream)
                yield out
                if out.finished:
                    return
        finally:
            # Consumer gone, error, or done: closing is what aborts a running upstream request.
            await _close(stream)


async def _close(stream: AsyncIterator[RequestOutput]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()

"""Prompt logprobs: each prompt token's logprob given the tokens before it (OpenAI's `echo` with
`logprobs`, TGI's `decoder_input_details`), taken from the logits of the prompt's own positions
in the steps that run the prompt (every chunk of a chunked prefill contributes its rows).

Position q's logits score token q + 1, so a step that runs prompt positions [c, c + n) yields
the logprobs of tokens c + 1 .. c + n; the last prompt position's logits score the first output
token, which is the sampler's business. Token 0 has no logprob (None, as OpenAI reports it).

Positions whose logprobs are owed but that the step does not run have no logits here: prompt
blocks found in the prefix cache, or blocks that a preempted request finds cached when it is
recomputed. Those positions are recomputed by one extra forward of the prompt up to the step's
start into a scratch KV cache, never into the pool: the cached pages may be shared with running
requests and are not rewritten. Such a request so pays a whole prefill, as if it had skipped
the prefix cache, while its cached pages are still shared and its own blocks still cached.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.attention.base import AttentionBackend
from engine.attention.metadata import build_metadata
from engine.host_copy import to_device_async
from engine.kv_pool import KVPool
from engine.model import CausalLM
from engine.outputs import TokenLogprob
from engine.request import Request
from engine.sampler import pack_logprobs, unpack_logprobs

# Rows scored at once: bounds the [rows, vocab] float32 logits (1024 x 128K vocab = 512 MB).
_CHUNK = 1024


def score(logits: torch.Tensor, targets: list[int], top: list[int]) -> list[TokenLogprob]:
    """Row i of `logits` [N, V] scores `targets[i]`, with its `top[i]` most likely tokens."""
    tgt = to_device_async(torch.tensor(targets, dtype=torch.long), logits.device)
    return unpack_logprobs(pack_logprobs(logits, tgt, list(top)).tolist(), list(top)).logprobs


class PromptLogprobs:
    """Computes, per step, the prompt logprobs that the step's requests owe (see above)."""

    def __init__(self, model: CausalLM, pool: KVPool, backend: AttentionBackend,
                 device: torch.device) -> None:
        self.model, self.pool, self.backend, self.device = model, pool, backend, device

    def compute(self, reqs: list[Request], num_new: list[int], row_start: list[int],
                step_logits: Callable[[torch.Tensor], torch.Tensor],
                ) -> dict[Request, list[TokenLogprob | None]]:
        """New entries of each request's `prompt_logprobs`, in position order.

        Request i ran positions [num_computed, num_computed + num_new[i]) as step rows from
        row_start[i]; `step_logits(rows)` gives those rows' logits [len(rows), V]."""
        found: dict[Request, list[TokenLogprob | None]] = {}
        rows: list[int] = []
        targets: list[int] = []
        top: list[int] = []
        owners: list[Request] = []
        for r, n, start in zip(reqs, num_new, row_start):
            done, c = len(r.prompt_logprobs), r.num_computed_tokens
            end = min(r.num_prompt_tokens, c + n + 1)  # positions p < end are scored here
            if r.params.prompt_logprobs is None or end <= done:
                continue
            entries: list[TokenLogprob | None] = [None] if done == 0 else []
            first_q = max(done, 1) - 1  # position whose logits score the first owed token
            if first_q < c:
                entries += self._recompute(r, first_q, min(c, end - 1))
            for q in range(max(first_q, c), end - 1):
                rows.append(start + q - c)
                targets.append(r.prompt_token_ids[q + 1])
                top.append(r.params.prompt_logprobs)
                owners.append(r)
            found[r] = entries
        for i in range(0, len(rows), _CHUNK):
            idx = to_device_async(torch.tensor(rows[i:i + _CHUNK], dtype=torch.long),
                                  self.device)
            scored = score(step_logits(idx), targets[i:i + _CHUNK], top[i:i + _CHUNK])
            for r, lp in zip(owners[i:i + _CHUNK], scored):
                found[r].append(lp)
        return found

    def _recompute(self, r: Request, lo: int, hi: int) -> list[TokenLogprob]:
        """Logprobs scored by positions [lo, hi) of r's prompt, from a scratch forward."""
        ids = r.prompt_token_ids[:hi]
        ps = self.pool.page_size
        n_pages = -(-len(ids) // ps)
        scratch = [torch.zeros((n_pages, *layer.shape[1:]), dtype=layer.dtype,
                               device=layer.device) for layer in self.pool.layers]
        meta = build_metadata([list(range(n_pages))], [0], [len(ids)], ps, self.device)
        plan = self.backend.plan(meta)
        tokens = to_device_async(torch.tensor(ids, dtype=torch.long), self.device)
        hidden = self.model(tokens, meta.positions, scratch, plan)[lo:hi]  # [hi - lo, H]
        out: list[TokenLogprob] = []
        for i in range(0, hi - lo, _CHUNK):
            j = min(i + _CHUNK, hi - lo)
            out += score(self.model.logits(hidden[i:j]), r.prompt_token_ids[lo + i + 1:lo + j + 1],
                         [r.params.prompt_logprobs or 0] * (j - i))
        return out

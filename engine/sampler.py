"""Turns one step's logits into one token per request (plus optional logprobs).

Contract of `Sampler.sample(logits [B, V], requests) -> SamplerOutput`, row b for requests[b]:

1. Repetition penalty (CTRL / HF style) over the set of prompt + output token ids: positive
   logits are divided by the penalty, negative ones multiplied.
2. Greedy rows (`params.greedy`: temperature 0 or top_k 1) take `torch.argmax` of the penalised
   logits, bit for bit what HF's greedy `generate` picks.
3. Other rows: divide by the temperature, keep the top-k, then the nucleus (the smallest set of
   most likely tokens whose probability sums to >= top_p; the top token always stays), and draw.
4. Draws are inverse-CDF lookups of one uniform number per row. A seeded request's number is a
   pure function of (seed, output position), so a replay on another replica or after a
   preemption draws the same token (a request resumed with its earlier output in the prompt
   counts positions from `params.resumed_tokens`); unseeded rows take theirs from torch's
   global CPU RNG.
5. `params.logprobs = n` reports the chosen token's logprob and the top-n alternatives from the
   log-softmax of the RAW logits (before penalty and temperature), as OpenAI reports them.

Everything runs batched on the logits' device; the only device-to-host copy is the one at the
end that turns the results into Python lists. `sample_async` leaves that copy in flight
(`PendingSample`), so that the host can prepare the next step meanwhile (overlapped
scheduling); its `token_ids` stay on the device as the next step's inputs.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field

import torch

from engine.host_copy import to_device_async
from engine.outputs import TokenLogprob
from engine.request import Request

_MASK64 = (1 << 64) - 1


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None] = field(default_factory=list)  # one per request


def _mix64(x: int) -> int:
    """SplitMix64's finaliser: a bijection of 64-bit ints that scatters nearby inputs."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def seeded_uniform(seed: int, step: int) -> float:
    """The uniform number in [0, 1) that a request with `seed` draws at output position `step`.

    Stateless on purpose: no generator object survives between steps, so the draw at step n
    depends on (seed, n) only, on any replica and on any device.
    """
    h = _mix64(_mix64(seed & _MASK64) ^ (step & _MASK64))
    return (h >> 11) * 2.0**-53  # the top 53 bits fill a double's mantissa exactly


class _Rows:
    """Per-row settings as device columns [B, 1], sent in one host-to-device copy."""

    def __init__(self, requests: list[Request], vocab: int, device: torch.device) -> None:
        params = [r.params for r in requests]
        self.any_sampled = not all(p.greedy for p in params)
        # Greedy rows ride along with settings that cost nothing; their draw is discarded.
        self.top_k = [1 if p.greedy else min(p.top_k or vocab, vocab) for p in params]
        self.top_p = [1.0 if p.greedy else float(p.top_p) for p in params]
        self.filtered = any(k < vocab for k in self.top_k if k > 1) or min(self.top_p) < 1.0
        table = torch.tensor(
            [
                [
                    1.0 if p.greedy else float(p.temperature), float(k), tp,
                    float(p.repetition_penalty), float(p.greedy), u,
                ]
                for p, k, tp, u in zip(
                    params, self.top_k, self.top_p, self._uniforms(requests), strict=True
                )
            ],
            dtype=torch.float64,
        )
        cols = to_device_async(table, device).unsqueeze(-1).unbind(1)  # six [B, 1] columns
        self.temperature = cols[0].float()
        self.top_k_t = cols[1].long()
        self.top_p_t = cols[2].float()
        self.penalty = cols[3].float()
        self.greedy = cols[4] > 0
        self.u = cols[5]  # float64

    def _uniforms(self, requests: list[Request]) -> list[float]:
        if not self.any_sampled:
            return [0.0] * len(requests)  # nothing is drawn: leave the global RNG untouched
        unseeded = sum(r.params.seed is None for r in requests)
        fresh = iter(torch.rand(unseeded, dtype=torch.float64).tolist())
        return [
            next(fresh) if r.params.seed is None
            # Output position: tokens known plus those launched steps are still sampling.
            else seeded_uniform(r.params.seed, r.params.resumed_tokens + len(r.output_token_ids)
                                + r.num_output_placeholders)
            for r in requests
        ]


class PendingSample:
    """A step's sampled ids (and logprobs) on their way to the host; `result()` waits for them.

    `token_ids` [B] stays on the device for a next step that feeds them back as inputs.
    """

    def __init__(self, token_ids: torch.Tensor, packed: torch.Tensor | None,
                 want: list[int | None]) -> None:
        self.token_ids = token_ids
        self._want = want
        src = token_ids if packed is None else packed
        self._event = None
        if src.is_cuda:
            self._host = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
            self._host.copy_(src, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = src

    def result(self) -> SamplerOutput:
        if self._event is not None:
            self._event.synchronize()
        rows = self._host.tolist()
        if all(n is None for n in self._want):
            return SamplerOutput(rows, [None] * len(rows))
        return unpack_logprobs(rows, self._want)


class Sampler:
    """Stateless; one instance can serve every step of every request."""

    def sample(self, logits: torch.Tensor, requests: list[Request]) -> SamplerOutput:
        return self.sample_async(logits, requests).result()

    def sample_async(self, logits: torch.Tensor, requests: list[Request]) -> PendingSample:
        assert logits.dim() == 2 and logits.shape[0] == len(requests), logits.shape
        raw = logits.float()  # [B, V]
        params = [r.params for r in requests]
        sampled = not all(p.greedy for p in params)
        penalised, rows = raw, None
        if sampled or any(p.repetition_penalty != 1.0 for p in params):
            rows = _Rows(requests, raw.shape[1], raw.device)
            penalised = self._apply_repetition_penalty(raw, requests, rows.penalty)
        token_ids = penalised.argmax(dim=-1)  # [B]
        if sampled and rows is not None:
            token_ids = torch.where(rows.greedy[:, 0], token_ids, self._draw(penalised, rows))

        want = [p.logprobs for p in params]
        if all(n is None for n in want):
            return PendingSample(token_ids, None, want)
        return PendingSample(token_ids, pack_logprobs(raw, token_ids, want), want)

    @staticmethod
    def _apply_repetition_penalty(
        logits: torch.Tensor, requests: list[Request], penalty: torch.Tensor
    ) -> torch.Tensor:
        rows = [b for b, r in enumerate(requests) if r.params.repetition_penalty != 1.0]
        if not rows:
            return logits
        # The penalty reads every earlier token: the engine resolves placeholders first.
        assert not any(requests[b].num_output_placeholders for b in rows), "unresolved tokens"
        B, V = logits.shape
        # Flat indices b * V + id of every (row, token) seen; a repeat just sets True twice.
        # array.extend converts a Python int list at C speed, far faster than torch.tensor.
        flat, lengths = array("q"), []
        for b in rows:
            r = requests[b]
            flat.extend(r.prompt_token_ids)
            flat.extend(r.output_token_ids)
            lengths.append(r.num_tokens)
        if not flat:
            return logits
        tok = torch.frombuffer(flat, dtype=torch.long)
        row_start = torch.repeat_interleave(torch.tensor(rows) * V, torch.tensor(lengths))
        # Ids outside the logits (a tokenizer larger than the head) are dropped, not wrapped
        # into the next row.
        ids = (tok + row_start)[(tok >= 0) & (tok < V)]
        hit = torch.zeros(B * V, dtype=torch.bool, device=logits.device)
        hit.index_fill_(0, to_device_async(ids, logits.device), True)
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        return torch.where(hit.view(B, V), penalised, logits)

    @staticmethod
    def _draw(logits: torch.Tensor, rows: _Rows) -> torch.Tensor:
        """One token per row from the temperature / top-k / top-p distribution: [B]."""
        V = logits.shape[1]
        scaled = logits / rows.temperature
        probs = scaled.softmax(dim=-1)  # [B, V]
        if rows.filtered:
            probs = probs.masked_fill(~Sampler._filter_mask(scaled, rows), 0.0)

        # The draw walks the cdf in vocabulary order for every row, whatever else is in the
        # batch, so a seeded request maps its uniform to the same token in any batch. float64,
        # because a float32 running sum stops growing under tokens of probability < ~1e-7.
        cdf = probs.double().cumsum(dim=-1)  # [B, V], non-decreasing
        # The first token whose cdf exceeds u * total; a zero-probability token adds nothing to
        # the cdf, so it is never the first to exceed it.
        pos = torch.searchsorted(cdf, rows.u * cdf[:, -1:], right=True).clamp_(max=V - 1)
        # Rounding can still land outside the kept set (u * total rounding up to the total, or a
        # parallel scan's rounding at block edges); fall back to the most likely token then.
        ok = probs.gather(1, pos) > 0
        return torch.where(ok, pos, probs.argmax(dim=-1, keepdim=True))[:, 0]

    @staticmethod
    def _filter_mask(scaled: torch.Tensor, rows: _Rows) -> torch.Tensor:
        """[B, V] bool, vocabulary order: the tokens that survive top-k, then top-p."""
        V = scaled.shape[1]
        kmax = max(rows.top_k)
        # Every row's candidates lie in its top kmax, so a partial top-k replaces the full sort
        # whenever every row sets top_k (the common top_k + top_p case).
        if kmax < V:
            ranked, order = scaled.topk(kmax, dim=-1)  # [B, kmax] each, sorted descending
        else:
            ranked, order = scaled.sort(dim=-1, descending=True)  # [B, V] each
        keep = torch.arange(kmax, device=scaled.device)[None, :] < rows.top_k_t
        probs = ranked.masked_fill(~keep, float("-inf")).softmax(dim=-1)  # renormalised top-k
        # Exclusive cumsum: a token stays while the mass strictly above it is < top_p, which
        # keeps the smallest nucleus reaching top_p and always the top token (nothing above).
        above = probs.cumsum(dim=-1) - probs
        keep &= (above < rows.top_p_t) | (rows.top_p_t >= 1.0)
        mask = torch.zeros_like(scaled, dtype=torch.bool)
        return mask.scatter_(1, order, keep)



def pack_logprobs(logits: torch.Tensor, token_ids: torch.Tensor,
                  want: list[int | None]) -> torch.Tensor:
    """[B, 2 + 2n] float64 rows, on the logits' device: token id, its logprob, the top-n ids,
    their logprobs (n = the most any row wants). Row b scores `token_ids[b]` under `logits[b]`.
    One packed tensor so the host waits once; ids < 2**53 survive exactly."""
    logp = logits.float().log_softmax(dim=-1)  # [B, V]
    chosen = logp.gather(1, token_ids[:, None])  # [B, 1]
    n = min(max((k or 0 for k in want), default=0), logits.shape[1])
    top_lp, top_ids = logp.topk(n, dim=-1)  # [B, n] each, sorted descending
    return torch.cat(
        [token_ids[:, None].double(), chosen.double(), top_ids.double(), top_lp.double()], dim=1)


def unpack_logprobs(packed: list[list[float]], want: list[int | None]) -> SamplerOutput:
    """`pack_logprobs`' rows on the host -> ids and a TokenLogprob per row (None where the row
    wants none) with its `want[b]` best alternatives."""
    n = (len(packed[0]) - 2) // 2 if packed else 0
    ids: list[int] = []
    out: list[TokenLogprob | None] = []
    for row, k in zip(packed, want, strict=True):
        ids.append(int(row[0]))
        if k is None:
            out.append(None)
            continue
        alt_ids, alt_lp = row[2 : 2 + n], row[2 + n :]
        top = [(int(alt_ids[j]), alt_lp[j]) for j in range(min(k, n))]
        out.append(TokenLogprob(int(row[0]), row[1], top))
    return SamplerOutput(ids, out)

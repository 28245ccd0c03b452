"""Several choices per prompt (OpenAI's `n` and `best_of`, TGI's `best_of`): their engine
requests, and which candidates win.

Each choice is an engine request of its own:
- choice i's seed is `seed + i` when the request has a seed, so the same request gives the same
  choices, and choice i alone is the n=1 request with seed `seed + i`; without a seed each
  choice draws its own random numbers;
- choice 0 keeps the request id and choice i >= 1 is `f"{rid}-{i}"`, so logs and X-Request-Id
  still lead to the request.
The choices of one prompt form one group for `api.generation.start_all`: choice 0 runs first
and the others start once its first output is out, which is when the engine that ran it holds
the prompt's full pages in its prefix cache; the others share those pages instead of computing
the prompt again (disaggregated: the decode replica's reservation finds them, so only the
blocks it lacks cross the KV transport).

Best of k: the candidates with the highest mean token logprob win, "the highest log probability
per token" of OpenAI's legacy completions, which is also how TGI ranks its best_of sequences.
"""

from __future__ import annotations

import dataclasses
import math

from api.generation import Collected, Job

# Choices (n) and candidates (best_of) per prompt. TGI's launcher defaults --max-best-of to 2;
# 16 keeps one request's fan-out (times up to max_client_batch_size prompts) bounded.
MAX_CHOICES = 16


def choice_seed(seed: int | None, i: int) -> int | None:
    return None if seed is None else seed + i


def choice_jobs(jobs: list[Job], k: int) -> list[Job]:
    """`k` jobs per job, prompt-major: job p's choice i is at p * k + i."""
    out: list[Job] = []
    for ids, params, rid in jobs:
        out.append((ids, params, rid))
        for i in range(1, k):
            out.append((ids, dataclasses.replace(params, seed=choice_seed(params.seed, i)),
                        f"{rid}-{i}"))
    return out


def mean_logprob(r: Collected) -> float:
    """The candidate's score; one without tokens or logprobs ranks last."""
    if not r.logprobs:
        return -math.inf
    return sum(lp.logprob for lp in r.logprobs) / len(r.logprobs)


def best(candidates: list[Collected], n: int) -> list[int]:
    """Indices of the `n` candidates with the highest mean token logprob, best first (on a tie,
    the earlier candidate)."""
    return sorted(range(len(candidates)), key=lambda i: -mean_logprob(candidates[i]))[:n]

"""The engine (tiny model, CPU) under random step-by-step traffic, against the same prompts run
alone: requests join between any two steps, on a few shared prefixes (the prefix cache, bursts
that wait for each other's blocks, cascade attention over shared pages), some aborted anywhere,
in a pool small enough to preempt; with and without overlapped scheduling.

Every request that ran to its end has exactly the greedy tokens of a plain engine (no prefix
cache, no cascade, a pool that never preempts); an aborted one has a prefix of them. Afterwards
no page is used and the page audit passes.
"""

from __future__ import annotations

import random

import pytest

from engine.llm import LLM
from engine.sampling_params import SamplingParams


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("overlap", ["off", "on"])
@pytest.mark.parametrize("seed", [0, 1])
def test_random_traffic_gives_each_request_its_tokens_alone(tiny_llama, seed: int,
                                                            overlap: str) -> None:
    rng = random.Random(seed)
    prefixes = [[rng.randrange(6, 2000) for _ in range(n)] for n in (8, 24, 40)]
    prompts, lengths = [], []
    for _ in range(28):
        prefix = rng.choice([[], *prefixes])
        prompts.append(prefix + [rng.randrange(6, 2000) for _ in range(rng.randint(1, 12))])
        lengths.append(rng.randint(1, 24))
    plain = LLM(tiny_llama, page_size=8, num_pages=512, cascade="off")
    reference = [c.token_ids for c in plain.generate(prompts, [greedy(n) for n in lengths])]

    # 14 pages of 8 tokens: two or three requests' worth, so requests preempt each other.
    llm = LLM(tiny_llama, page_size=8, num_pages=14, max_num_batched_tokens=32,
              enable_prefix_caching=True, cascade="on", overlap_scheduling=overlap)
    ids: dict[str, int] = {}
    got: dict[str, list[int]] = {}
    aborted: set[str] = set()
    todo = list(range(len(prompts)))

    def collect(outputs) -> None:
        for out in outputs:
            got.setdefault(out.request_id, []).extend(out.new_token_ids)

    while todo or llm.engine.has_unfinished():
        x = rng.random()
        if todo and x < 0.4:
            i = todo.pop(0)
            ids[llm.add_request(prompts[i], greedy(lengths[i]))] = i
        elif x < 0.45 and ids:
            rid = rng.choice(list(ids))
            if llm.abort(rid):
                aborted.add(rid)
        else:
            collect(llm.step())
        llm.engine.check_integrity()
    collect(llm.step())  # a step still in flight (overlap) comes back with the next call

    assert llm.engine.num_pages_used == 0 and not llm.engine.has_unfinished()
    llm.engine.check_integrity()
    finished = 0
    for rid, i in ids.items():
        tokens = got.get(rid, [])
        if rid in aborted and tokens != reference[i]:
            assert tokens == reference[i][:len(tokens)], f"request {i} (aborted)"
        else:
            assert tokens == reference[i], f"request {i}"
            finished += 1
    # The traffic did what it is for.
    stats = llm.engine.stats()
    assert finished >= len(prompts) // 4 and aborted
    assert stats.num_preemptions > 0 and stats.num_cascade_steps > 0
    assert llm.engine.allocator.num_evictions > 0

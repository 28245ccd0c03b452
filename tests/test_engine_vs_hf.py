"""Greedy tokens from the engine equal HF transformers `generate`, token for token (fp32, CPU)."""

from __future__ import annotations

import random

import pytest

from engine.llm import LLM
from engine.sampling_params import SamplingParams
from tests.hf_reference import hf_greedy

GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
LENGTHS = (1, 7, 16, 17, 40, 129, 300)


def _prompts(seed: int, lengths=LENGTHS, vocab: int = 2000) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(6, vocab) for _ in range(n)] for n in lengths]


def _run_mid_join(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    """Half the requests start; the rest join while the first ones are mid-prefill/decode."""
    tokens: dict[str, list[int]] = {}
    ids = [llm.add_request(p, params) for p in prompts[::2]]
    for _ in range(5):
        for out in llm.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    ids += [llm.add_request(p, params) for p in prompts[1::2]]
    while llm.engine.has_unfinished():
        for out in llm.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    by_prompt = dict(zip([tuple(p) for p in prompts[::2] + prompts[1::2]], ids))
    return [tokens[by_prompt[tuple(p)]] for p in prompts]


@pytest.mark.parametrize("overlap", ["off", "on"])
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_greedy_equals_hf_with_small_chunks_and_mid_run_joins(tiny_models, family, overlap):
    path = tiny_models[family]
    llm = LLM(path, page_size=16, num_pages=256, max_num_batched_tokens=16,
              enable_prefix_caching=True, overlap_scheduling=overlap)
    prompts = _prompts(seed=1)
    got = _run_mid_join(llm, prompts, GREEDY)
    for prompt, toks in zip(prompts, got):
        assert toks == hf_greedy(path, prompt, GREEDY.max_tokens), f"prompt of {len(prompt)}"
    llm.engine.allocator.check_integrity()
    assert llm.engine.num_pages_used == 0


def test_prefix_cache_hit_skips_recompute_and_keeps_tokens(tiny_llama):
    llm = LLM(tiny_llama, page_size=16, num_pages=128, max_num_batched_tokens=64)
    shared = _prompts(seed=2, lengths=(80,))[0]
    a, b = shared + [11, 12, 13], shared + [21, 22]
    first = llm.generate([a], GREEDY)[0]
    rid = llm.add_request(b, GREEDY)
    req = llm.engine.scheduler.requests[rid]
    llm.step()
    # 5 full blocks of the shared 80 tokens were found: only the last 2 tokens ran.
    assert req.num_cached_tokens == 80
    while llm.engine.has_unfinished():
        llm.step()
    assert first.token_ids == hf_greedy(tiny_llama, a, 20)
    assert req.output_token_ids == hf_greedy(tiny_llama, b, 20)
    # The same prompt again: everything but its last token comes from the cache.
    again = llm.add_request(a, GREEDY)
    req = llm.engine.scheduler.requests[again]
    llm.step()
    assert req.num_cached_tokens == 80
    llm.engine.allocator.check_integrity()


@pytest.mark.parametrize("overlap", ["off", "on"])
def test_preemption_with_small_pool_gives_same_tokens(tiny_llama, overlap):
    prompts = _prompts(seed=3, lengths=(30, 45, 60, 20, 50, 35))
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    big = LLM(tiny_llama, page_size=8, num_pages=512).generate(prompts, params)
    small = LLM(tiny_llama, page_size=8, num_pages=16, enable_prefix_caching=False,
                overlap_scheduling=overlap)
    out = small.generate(prompts, params)
    assert [o.token_ids for o in out] == [o.token_ids for o in big]
    assert small.engine.scheduler.num_preemptions > 0
    small.engine.allocator.check_integrity()
    assert small.engine.allocator.num_free == 16


@pytest.mark.parametrize("overlap", ["off", "on"])
def test_cascade_decode_gives_same_tokens(tiny_llama, overlap):
    shared = _prompts(seed=4, lengths=(64,))[0]
    prompts = [shared + p for p in _prompts(seed=5, lengths=(3, 9, 1, 17, 5))]
    plain = LLM(tiny_llama, page_size=16, num_pages=256, cascade="off").generate(prompts, GREEDY)
    llm = LLM(tiny_llama, page_size=16, num_pages=256, cascade="on", overlap_scheduling=overlap)
    llm.generate(prompts[:1], GREEDY)  # fill the prefix cache so the rest share its pages
    out = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in out] == [o.token_ids for o in plain]
    assert llm.engine.runner.num_cascade_steps > 0


def test_text_prompt_and_stop_string(tiny_llama):
    llm = LLM(tiny_llama, num_pages=64)
    full = llm.generate("The river", SamplingParams(max_tokens=12, temperature=0))[0]
    assert full.text and full.finish_reason in ("length", "stop")
    stop = full.text[3:6]
    cut = llm.generate("The river", SamplingParams(max_tokens=12, temperature=0, stop=[stop]))[0]
    assert cut.finish_reason == "stop" and stop not in cut.text
    assert full.text.startswith(cut.text)


@pytest.mark.parametrize("prompt, params, message", [
    ([], SamplingParams(), "empty"),
    ([5] * 2048, SamplingParams(), "2048 tokens"),
    ([5, 2000], SamplingParams(), "outside the vocabulary"),
    ([5], SamplingParams(max_tokens=1000), "does not fit"),
])
def test_bad_input_is_a_clear_value_error(tiny_llama, prompt, params, message):
    llm = LLM(tiny_llama, num_pages=32)
    with pytest.raises(ValueError, match=message):
        llm.generate([prompt], params)
    assert not llm.engine.has_unfinished()


@pytest.mark.parametrize("kwargs", [{"temperature": -1}, {"top_p": 0}, {"max_tokens": 0},
                                    {"top_k": -2}, {"seed": -1}, {"repetition_penalty": 0}])
def test_invalid_sampling_values(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("overlap", ["off", "on"])
def test_a_burst_on_a_new_prefix_computes_it_once_and_decodes_through_cascade(tiny_llama,
                                                                            overlap):
    """Five prompts on one new 64-token prefix, added together: the first computes the prefix,
    the others wait for it and compute only their own tokens, so all five share its pages and
    their decode steps run as cascades, with the tokens of a run without either."""
    shared = _prompts(seed=4, lengths=(64,))[0]
    prompts = [shared + p for p in _prompts(seed=5, lengths=(3, 9, 1, 17, 5))]
    plain = LLM(tiny_llama, page_size=16, num_pages=256, cascade="off",
                enable_prefix_caching=False).generate(prompts, GREEDY)
    llm = LLM(tiny_llama, page_size=16, num_pages=256, cascade="on", overlap_scheduling=overlap)
    out = llm.generate(prompts, GREEDY)  # no warm-up: the prefix is new to the cache
    assert [o.token_ids for o in out] == [o.token_ids for o in plain]
    assert llm.engine.scheduler.num_prefill_tokens == 67 + 9 + 1 + 17 + 5  # not 5 x 64 + ...
    assert llm.engine.runner.num_cascade_steps > 0
    llm.engine.check_integrity()

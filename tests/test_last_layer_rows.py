"""A prefill's last layer runs its output projection and MLP on the rows that sample only.

Every layer writes the K/V of every token, and every layer but the last feeds the next one
all its rows; the last layer's other rows are read by nothing unless prompt logprobs score
each prompt position. Token ids against HF transformers stay covered by test_engine_vs_hf.
"""

from __future__ import annotations

import pytest
import torch

from engine import fp8_fusion
from engine.fp8_linear import Fp8Linear
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from tests.test_model_residual import ARCH, _model, _step


@pytest.mark.parametrize("fp8", [False, True], ids=["plain", "fp8-fused"])
@torch.inference_mode()
def test_the_models_rows_are_the_full_forwards_rows_and_the_kv_is_the_same(fp8):
    model = _model()
    if fp8:  # the fused fp8 layer path (it runs on the CPU too, in float32)
        for layer in model.layers:
            for name in fp8_fusion.PROJECTIONS:
                setattr(layer, name, Fp8Linear.from_linear(getattr(layer, name)))
        assert fp8_fusion.fusable(model.layers[-1])
    pool, plan, ids, positions = _step()  # two requests, 5 + 3 tokens
    full_pool, full_plan, _, _ = _step()
    rows = torch.tensor([4, 7])  # each request's last token
    cut = model(ids, positions, pool.layers, plan, rows=rows)
    full = model(ids, positions, full_pool.layers, full_plan)
    assert cut.shape == (2, ARCH.hidden_size) and full.shape == (8, ARCH.hidden_size)
    torch.testing.assert_close(cut, full[rows], rtol=1e-5, atol=1e-6)
    for layer, full_layer in zip(pool.layers, full_pool.layers):
        assert torch.equal(layer, full_layer)


def _rows_per_step(llm: LLM, prompts: list[list[int]], params: SamplingParams,
                   ) -> list[tuple[int, int]]:
    """(rows into the first layer's MLP, rows into the last layer's MLP) for each step."""
    layers = llm.engine.model.layers
    seen: list[list[int]] = [[], []]
    hooks = [layer.down_proj.register_forward_hook(
        lambda _m, args, _out, i=i: seen[i].append(args[0].shape[0]))
        for i, layer in enumerate((layers[0], layers[-1]))]
    try:
        llm.generate(prompts, params)
    finally:
        for h in hooks:
            h.remove()
    return list(zip(*seen))


@pytest.fixture(scope="module")
def small_budget_llm(tiny_llama: str) -> LLM:
    # 8 tokens a step: a 12-token prompt takes two chunks, the first of which samples nothing
    return LLM(tiny_llama, num_pages=64, max_num_batched_tokens=8,
               enable_prefix_caching=False)


def test_a_prefill_step_runs_the_last_layer_on_its_sampling_rows(small_budget_llm: LLM):
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    # 5 + 3 prompt tokens in one step, both sample; then a decode step of 2 rows
    assert _rows_per_step(small_budget_llm, [[11, 12, 13, 14, 15], [21, 22, 23]],
                          params) == [(8, 2), (2, 2)]


def test_a_chunk_that_samples_nothing_keeps_its_rows(small_budget_llm: LLM):
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    # 12 prompt tokens: a chunk of 8 (no sample: no kernels of zero rows), a chunk of 4 (its
    # last samples), a decode step
    assert _rows_per_step(small_budget_llm, [list(range(30, 42))], params) == [
        (8, 8), (4, 1), (1, 1)]


def test_prompt_logprobs_keep_every_row(small_budget_llm: LLM):
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, prompt_logprobs=1)
    assert _rows_per_step(small_budget_llm, [[11, 12, 13, 14, 15], [21, 22, 23]],
                          params) == [(8, 8), (2, 2)]

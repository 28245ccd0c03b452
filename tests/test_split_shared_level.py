"""SplitSharedLevel: a large cascade group's shared level as FA3 over slices of the prefix, run
on the CPU against test_flashinfer_graph_plan's stand-in for FlashInfer's wrappers (each entry
attended by the torch reference), so what is under test is the glue: the slices, the repeated
queries, the merge, and that such a step runs eagerly."""

from __future__ import annotations

import torch

from engine.attention import flashinfer_backend as fb
from engine.attention import split_shared_level
from engine.attention.cascade import plan_cascade
from engine.attention.metadata import build_metadata
from engine.attention.split_shared_level import SplitSharedLevel, split_pays
from engine.attention.torch_backend import TorchBackend
from tests.test_flashinfer_graph_plan import CPU, HKV, HQ, NUM_PAGES, PS, STAND_IN, D, _backend


def test_the_rule_splits_one_group_of_128_queries_over_32k_tokens_or_more():
    assert split_pays([0, 128], [0, 2048], 16)
    assert split_pays([0, 256], [0, 4096], 16)
    assert not split_pays([0, 127], [0, 2048], 16)  # too few queries
    assert not split_pays([0, 128], [0, 2047], 16)  # too short a prefix
    assert not split_pays([0, 128, 256], [0, 2048, 4096], 16)  # two groups: FA2


def _group_batch():
    """4 requests sharing 7 full pages with 1-2 pages of their own, and one loner."""
    shared = list(range(10, 17))
    tables = [shared + [20 + 2 * i, 21 + 2 * i] for i in range(4)] + [[40, 41]]
    lens = [7 * PS + 5, 7 * PS + 2, 7 * PS + 6, 7 * PS + 8, 6]
    plan = plan_cascade(tables, lens, PS, mode="on")
    tables, lens = [tables[i] for i in plan.order], [lens[i] for i in plan.order]
    return build_metadata(tables, [n - 1 for n in lens], [1] * 5, PS, CPU, plan), tables, lens


def test_a_large_group_s_shared_level_runs_split_eagerly_and_equals_plain_attention(monkeypatch):
    monkeypatch.setattr(split_shared_level, "MIN_QUERIES", 4)
    monkeypatch.setattr(split_shared_level, "MIN_SHARED_TOKENS", 7 * PS)
    torch.manual_seed(0)
    be = _backend()
    be.cascade.split = SplitSharedLevel(STAND_IN, be.workspace, splits=3)
    be.enable_cuda_graphs([4, 8], max_num_indices=8 * 30, scratch_page=NUM_PAGES)
    meta, tables, lens = _group_batch()
    shared = meta.cascade[0]
    assert shared.qo_indptr_host == [0, 4] and shared.kv_indptr_host == [0, 7]
    assert be.cascade.splits(meta) and not be.can_graph(meta, 8)  # a split step runs eagerly
    q, kv = torch.randn(5, HQ, D), torch.randn(5, 2, HKV, D)
    cache = torch.randn(NUM_PAGES, 2, PS, HKV, D)
    ref_cache = cache.clone()
    ref = TorchBackend(HQ, HKV, D, torch.float32, "cpu", PS).plan(
        build_metadata(tables, [n - 1 for n in lens], [1] * 5, PS, CPU)).forward(
        0, q, kv[:, 0], kv[:, 1], ref_cache)
    step = be.plan(meta)
    assert isinstance(step, fb.CascadeDecodePlan) and step.num_cascade == 4
    # 3 slices of the 7 shared pages (2, 2, 3 pages), each with the group's 4 queries
    w = be.cascade.split.wrapper
    assert w.qo.tolist() == [0, 4, 8, 12] and w.kv_indptr.tolist() == [0, 2, 4, 7]
    assert w.kv_indices.tolist() == list(range(10, 17)) and w.last.tolist() == [PS] * 3
    assert not w.causal
    out = step.forward(0, q, kv[:, 0], kv[:, 1], cache)
    assert (out - ref).abs().max().item() <= 1e-5
    assert torch.equal(cache, ref_cache)


def test_below_the_rule_the_shared_level_stays_on_fa2_and_the_step_has_a_graph():
    be = _backend()
    be.cascade.split = SplitSharedLevel(STAND_IN, be.workspace, splits=3)
    be.enable_cuda_graphs([4, 8], max_num_indices=8 * 30, scratch_page=NUM_PAGES)
    meta, _, _ = _group_batch()
    assert not be.cascade.splits(meta) and be.can_graph(meta, 8)
    be.plan(meta)
    assert not be.cascade._split_planned and be.cascade.split.queries == 0

"""The split shared level of cascade graphs (engine/attention/split_shared_level.py), on the CPU:
when a step takes it, the slices it plans, and that a replay of its graph equals plain
attention. FlashInfer is tests/test_flashinfer_graph_plan.py's stand-in (FA3's kernel is the
same reference attention there); the kernels themselves are tests/gpu's."""

from __future__ import annotations

import random

import pytest
import torch

from engine.attention import split_shared_level as split_level
from engine.attention.cascade import plan_cascade
from engine.attention.metadata import build_metadata
from engine.attention.split_shared_level import split_level_args, split_pays
from engine.attention.torch_backend import TorchBackend
from engine.cuda_graph import TOY_SHARED_PAGES, toy_step
from tests.test_flashinfer_graph_plan import CPU, HKV, HQ, PS, D, _backend


def _group_meta(members: int, shared_pages: int, own: list[int], loners: int = 0,
                seed: int = 0):
    """A decode step: `members` requests sharing `shared_pages` full pages (own[i] tokens of
    their own each, cycling), then `loners` requests of 3 tokens, on random distinct pages; in
    the cascade planner's order. Returns (tables, kv_lens, meta)."""
    rng = random.Random(seed)
    free = list(range(shared_pages + members * 4 + loners + 8))
    rng.shuffle(free)
    prefix = [free.pop() for _ in range(shared_pages)]
    tables, lens = [], []
    for i in range(members):
        n = own[i % len(own)]
        tables.append(prefix + [free.pop() for _ in range(-(-n // PS))])
        lens.append(shared_pages * PS + n)
    for _ in range(loners):
        tables.append([free.pop()])
        lens.append(3)
    plan = plan_cascade(tables, lens, PS, mode="on")
    tables, lens = [tables[i] for i in plan.order], [lens[i] for i in plan.order]
    return tables, lens, build_metadata(tables, [n - 1 for n in lens], [1] * len(lens), PS, CPU,
                                        plan)


def test_split_pays_only_for_one_group_of_128_over_an_8k_token_prefix():
    pages = 8192 // PS
    assert split_pays(_group_meta(128, pages, [5])[2])
    assert not split_pays(_group_meta(127, pages, [5])[2])  # too few queries
    assert not split_pays(_group_meta(128, pages - 1, [5])[2])  # too short a prefix
    assert split_pays(_group_meta(128, pages, [5], loners=2)[2])  # loners: own level only


def test_split_level_args_pose_each_slice_as_a_request_of_every_row():
    _, _, meta = _group_meta(3, 10, [2, 6])
    shared = meta.cascade[0]
    args = split_level_args(meta, 8, splits=4)
    assert args.qo_indptr == [0, 8, 16, 24, 32]
    assert args.kv_indptr == [0, 2, 5, 7, 10]  # page-aligned slices of the 10 shared pages
    assert args.kv_last_page_len == [PS] * 4  # shared pages are full
    assert args.kv_indices is shared.kv_indices
    with pytest.raises(ValueError, match="3 shared pages cannot make 4 slices"):
        split_level_args(_group_meta(3, 3, [2])[2], 8, splits=4)


@pytest.fixture
def small_splits(monkeypatch):
    """Split graphs from bucket 8 and 6-page prefixes, so that a toy step takes them."""
    monkeypatch.setattr(split_level, "MIN_QUERIES", 8)
    monkeypatch.setattr(split_level, "MIN_SHARED_TOKENS", 6 * PS)


def _graph_backend(num_pages: int):
    be = _backend()
    be._split_graphs = lambda: True  # as on Hopper over bf16 pages
    be.enable_cuda_graphs([4, 8], max_num_indices=8 * 40, scratch_page=num_pages)
    return be


def test_buckets_of_enough_rows_capture_a_split_kind(small_splits):
    be = _graph_backend(100)
    assert be.cascade_graph_kinds(8) == ("cascade", "cascade_split")
    assert be.cascade_graph_kinds(4) == ("cascade",)


@pytest.mark.parametrize("seed", range(3))
def test_split_graph_replay_equals_plain_attention_and_the_fa2_graph(small_splits, seed):
    """One group of 8 over a 6-9 page prefix replays bucket 8's split graph; with `split_on`
    off the same step replays the FA2 cascade graph; both equal plain attention and write the
    same pool bytes. A step with a smaller group keeps the FA2 graph."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    b, num_pages = 8, 100
    be = _graph_backend(num_pages)
    toy = toy_step(b, True, PS, CPU)
    assert toy.cascade[0].kv_indptr_host[-1] == TOY_SHARED_PAGES
    captured = {}
    for kind in be.cascade_graph_kinds(b):
        cache = torch.zeros(num_pages + 1, 2, PS, HKV, D)
        captured[kind] = be.plan_cuda_graph(toy, b, kind)
        kv = torch.randn(b, 2, HKV, D)
        captured[kind].forward(0, torch.randn(b, HQ, D), kv[:, 0], kv[:, 1], cache)
    own = [rng.randint(1, 9) for _ in range(3)]
    tables, lens, meta = _group_meta(8, rng.randint(6, 9), own, seed=seed)
    done = [n - 1 for n in lens]
    cache = torch.randn(num_pages + 1, 2, PS, HKV, D)
    q, kv = torch.randn(b, HQ, D), torch.randn(b, 2, HKV, D)
    ref_cache = cache.clone()
    plain = TorchBackend(HQ, HKV, D, torch.float32, "cpu", PS)
    ref = plain.plan(build_metadata(tables, done, [1] * b, PS, CPU)).forward(
        0, q, kv[:, 0], kv[:, 1], ref_cache)
    for split_on, kind in ((True, "cascade_split"), (False, "cascade")):
        be.graph_buffers.split_on = split_on
        assert be.can_graph(meta, b) and be.graph_kind(meta, b) == kind
        step_cache = cache.clone()
        be.plan_cuda_graph(meta, b)
        out = captured[kind].forward(0, q, kv[:, 0], kv[:, 1], step_cache)  # the replay
        assert (out - ref).abs().max().item() <= 1e-5, kind
        assert torch.equal(step_cache[:num_pages], ref_cache[:num_pages])
    be.graph_buffers.split_on = True
    _, _, smaller = _group_meta(7, 6, own, loners=1, seed=seed)
    assert be.graph_kind(smaller, b) == "cascade"

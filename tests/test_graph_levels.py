"""What a captured decode graph's wrappers are planned with (engine/attention/flashinfer_graphs.py),
checked on the CPU: the index arithmetic is plain Python and torch, only the kernels are GPU.

A graph step of bucket b has the n requests' rows, then b - n padding rows on the pool's scratch
page. The cascade graph runs every row through its own level, the groups through the shared
level (padded to a fixed number of entries of no queries and no pages), and merges the shared
part into the group rows only. Rebuilt here with the torch reference kernels, that must equal
plain attention for every real row (fp32, 1e-5), and the padding rows must see the scratch page
alone.
"""

from __future__ import annotations

import random

import pytest
import torch

from engine.attention.cascade import plan_cascade
from engine.attention.flashinfer_graphs import (
    LevelArgs,
    cascade_graph_groups,
    merge_mask,
    own_level_args,
    shared_level_args,
)
from engine.attention.metadata import build_metadata
from engine.attention.torch_backend import TorchBackend, attend, gather_kv, merge_states

HQ, HKV, D, PS = 4, 2, 8, 4
CPU = torch.device("cpu")
NUM_PAGES = 300
SCRATCH = NUM_PAGES  # the page past the allocator's, as KVPool adds it


def shared_prefix_batch(rng: random.Random, num_pages: int, max_groups: int, max_members: int,
                        max_requests: int | None = None) -> tuple[list[list[int]], list[int]]:
    """Block tables and KV lengths of a decode batch over disjoint random pages: 1..max_groups
    groups of 2..max_members requests sharing 1-5 full pages (1-9 tokens of their own each),
    then loners of 1-15 tokens: 0-3 of them, or up to `max_requests` requests in all."""
    free = list(range(num_pages))
    rng.shuffle(free)
    tables, lens = [], []
    for _ in range(rng.randint(1, max_groups)):
        shared = [free.pop() for _ in range(rng.randint(1, 5))]
        for _ in range(rng.randint(2, max_members)):
            own_len = rng.randint(1, 9)
            tables.append(shared + [free.pop() for _ in range(-(-own_len // PS))])
            lens.append(len(shared) * PS + own_len)
    for _ in range(rng.randint(0, 3 if max_requests is None else max_requests - len(tables))):
        n = rng.randint(1, 15)
        tables.append([free.pop() for _ in range(-(-n // PS))])
        lens.append(n)
    return tables, lens


def _batch(rng: random.Random):
    """Groups sharing 1-5 pages, loners; in the cascade planner's order."""
    tables, lens = shared_prefix_batch(rng, NUM_PAGES, max_groups=3, max_members=4)
    plan = plan_cascade(tables, lens, PS, mode="on")
    assert plan is not None
    tables, lens = [tables[i] for i in plan.order], [lens[i] for i in plan.order]
    meta = build_metadata(tables, [n - 1 for n in lens], [1] * len(lens), PS, CPU, plan)
    return tables, lens, meta


def _entry_kv(args: LevelArgs, e: int) -> tuple[list[int], int]:
    """Entry e's pages and KV length."""
    s, t = args.kv_indptr[e], args.kv_indptr[e + 1]
    pages = args.kv_indices[s:t].tolist()
    return pages, (len(pages) - 1) * PS + args.kv_last_page_len[e] if pages else 0


def _run_level(args: LevelArgs, q, cache, rows: int, causal: bool):
    """Reference of one level wrapper: out [rows, Hq, D] and base-2 LSE, -inf where no entry."""
    out = torch.zeros(rows, HQ, D)
    lse = torch.full((rows, HQ), float("-inf"))
    for e in range(len(args.kv_last_page_len)):
        lo, hi = args.qo_indptr[e], args.qo_indptr[e + 1]
        pages, kv_len = _entry_kv(args, e)
        if hi == lo:
            assert pages == []  # a padding entry: no queries, no pages
            continue
        k, v = gather_kv(cache, torch.tensor(pages), kv_len)
        out[lo:hi], lse[lo:hi] = attend(q[lo:hi], k, v, D ** -0.5, causal)
    return out, lse


@pytest.mark.parametrize("seed", range(12))
def test_cascade_graph_levels_equal_plain_attention(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    tables, lens, meta = _batch(rng)
    n = meta.batch_size
    b = next(x for x in (4, 8, 16, 32) if x >= n and cascade_graph_groups(x) >= 3)
    groups = cascade_graph_groups(b)
    scratch = torch.full((b,), SCRATCH, dtype=torch.int32)
    own = own_level_args(meta, b, scratch)
    shared = shared_level_args(meta, groups)
    assert len(own.kv_last_page_len) == b and own.qo_indptr == list(range(b + 1))
    assert len(shared.kv_last_page_len) == groups
    cache = torch.randn(NUM_PAGES + 1, 2, PS, HKV, D)
    q = torch.randn(b, HQ, D)
    out, lse = _run_level(own, q, cache, b, causal=True)
    s_out, s_lse = _run_level(shared, q, cache, b, causal=False)
    mask = torch.tensor(merge_mask(meta, b))
    merged, _ = merge_states(out, lse, s_out, s_lse)
    out = torch.where(mask[:, None, None], merged, out)
    # plain attention of the real rows, from the step's own metadata
    plain = TorchBackend(num_q_heads=HQ, num_kv_heads=HKV, head_dim=D, dtype=torch.float32,
                         device="cpu", page_size=PS)
    plain_meta = build_metadata(tables, [x - 1 for x in lens], [1] * n, PS, CPU)
    k_new = cache[plain_meta.slot_mapping // PS, 0, plain_meta.slot_mapping % PS]
    v_new = cache[plain_meta.slot_mapping // PS, 1, plain_meta.slot_mapping % PS]
    ref = plain.plan(plain_meta).forward(0, q[:n], k_new, v_new, cache.clone())
    assert (out[:n] - ref).abs().max().item() <= 1e-5
    assert mask.tolist() == [True] * meta.num_cascade_reqs + [False] * (b - meta.num_cascade_reqs)
    for row in range(n, b):  # padding rows: the scratch page, one token
        assert _entry_kv(own, row) == ([SCRATCH], 1)


def test_plain_graph_rows_are_the_requests_pages_then_the_scratch_page():
    tables = [[5, 6], [9], [2, 3, 4]]
    lens = [7, 2, 9]
    meta = build_metadata(tables, [x - 1 for x in lens], [1] * 3, PS, CPU)
    own = own_level_args(meta, 8, torch.full((8,), SCRATCH, dtype=torch.int32))
    assert own.kv_indptr == [0, 2, 3, 6, 7, 8, 9, 10, 11]
    assert own.kv_indices.tolist() == [5, 6, 9, 2, 3, 4] + [SCRATCH] * 5
    assert own.kv_last_page_len == [3, 2, 1] + [1] * 5
    assert merge_mask(meta, 8) == [False] * 8


def test_shared_level_padding_entries_are_empty_and_too_many_groups_refused():
    tables = [[1, 2, 10], [1, 2, 11], [3, 12], [3, 13]]
    lens = [9, 10, 5, 6]
    plan = plan_cascade(tables, lens, PS, mode="on")
    assert [g.num_shared_pages for g in plan.groups] == [2, 1]
    meta = build_metadata([tables[i] for i in plan.order], [lens[i] - 1 for i in plan.order],
                          [1] * 4, PS, CPU, plan)
    shared = shared_level_args(meta, 4)
    assert shared.qo_indptr == [0, 2, 4, 4, 4]
    assert shared.kv_indptr == [0, 2, 3, 3, 3]
    assert shared.kv_indices.tolist() == [1, 2, 3]
    assert shared.kv_last_page_len == [PS, PS, PS, PS]
    with pytest.raises(ValueError, match="2 groups do not fit a graph of 1"):
        shared_level_args(meta, 1)


def test_cascade_graph_groups_per_bucket():
    assert [cascade_graph_groups(b) for b in (1, 2, 4, 8, 16, 128)] == [0, 1, 2, 4, 4, 4]


def test_scratch_page_is_one_past_every_page_the_allocator_hands_out():
    from engine.block_allocator import BlockAllocator
    from engine.kv_pool import KVPool
    from engine.model_arch import ModelArch

    arch = ModelArch("LlamaForCausalLM", vocab_size=16, hidden_size=8, intermediate_size=16,
                     num_layers=2, num_heads=HQ, num_kv_heads=HKV, head_dim=D, rms_norm_eps=1e-5,
                     rope_theta=10000.0)
    pool = KVPool(arch, num_pages=6, page_size=PS, dtype=torch.float32, device="cpu")
    pages = BlockAllocator(num_pages=6, page_size=PS).allocate(6)
    assert sorted(pages) == list(range(6)) and pool.scratch_page == 6
    assert pool.layers[0].shape[0] == 7  # the scratch page exists in every layer's tensor
    assert pool.export_shape(3) == (2, 3, 2, PS, HKV, D)

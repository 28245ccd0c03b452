"""build_metadata and plan_cascade over block-table rows equal a plain list reference, exactly."""

from __future__ import annotations

import random

import pytest
import torch

from engine.attention.cascade import cascade_pays, plan_cascade
from engine.attention.metadata import build_metadata
from engine.block_table import BlockTableMirror, PageRows
from engine.request import Request
from engine.sampling_params import SamplingParams

CPU = torch.device("cpu")


# -- the reference: one request, one page, one token at a time --------------------------------
def ref_paging(pages: list[int], kv_len: int, ps: int) -> tuple[list[int], int]:
    n = (kv_len + ps - 1) // ps
    return pages[:n], (kv_len - 1) % ps + 1 if kv_len else 0


def ref_metadata(tables, done, new, ps, groups=None) -> dict:
    out = dict(qo_indptr=[0], kv_indptr=[0], kv_indices=[], kv_last_page_len=[],
               slot_mapping=[], positions=[], kv_lens=[])
    for table, d, n in zip(tables, done, new):
        pages, last = ref_paging(table, d + n, ps)
        out["qo_indptr"].append(out["qo_indptr"][-1] + n)
        out["kv_indices"] += pages
        out["kv_indptr"].append(len(out["kv_indices"]))
        out["kv_last_page_len"].append(last)
        out["kv_lens"].append(d + n)
        for pos in range(d, d + n):
            out["positions"].append(pos)
            out["slot_mapping"].append(table[pos // ps] * ps + pos % ps)
    if groups is not None:
        shared_lv = dict(qo_indptr=[0], kv_indptr=[0], kv_indices=[], kv_last_page_len=[])
        own_lv = dict(qo_indptr=[0], kv_indptr=[0], kv_indices=[], kv_last_page_len=[])
        b = 0
        for size, s in groups:
            shared_lv["kv_indices"] += tables[b][:s]
            shared_lv["kv_indptr"].append(len(shared_lv["kv_indices"]))
            shared_lv["kv_last_page_len"].append(ps)
            shared_lv["qo_indptr"].append(shared_lv["qo_indptr"][-1] + size)
            for _ in range(size):
                own_len = done[b] + new[b] - s * ps
                pages, last = ref_paging(tables[b][s:], own_len, ps)
                own_lv["kv_indices"] += pages
                own_lv["kv_indptr"].append(len(own_lv["kv_indices"]))
                own_lv["kv_last_page_len"].append(last)
                own_lv["qo_indptr"].append(b + 1)
                b += 1
        out["levels"] = [shared_lv, own_lv]
    return out


def ref_plan(tables, kv_lens, ps, mode):
    """-> (order, [(members, shared pages)]) or None, by comparing pages one by one."""
    by_first: dict[int, list[int]] = {}
    for i, t in enumerate(tables):
        if t:
            by_first.setdefault(t[0], []).append(i)
    groups = []
    for members in by_first.values():
        if len(members) < 2:
            continue
        limit = min((kv_lens[i] - 1) // ps for i in members)
        s = 0
        while s < limit and all(tables[i][s] == tables[members[0]][s] for i in members):
            s += 1
        if cascade_pays(len(members), s * ps, mode):
            groups.append((members, s))
    if not groups:
        return None
    order = [i for m, _ in groups for i in m]
    return order + [i for i in range(len(tables)) if i not in order], groups


def assert_meta_equal(meta, ref: dict, ps: int, num_cascade: int = 0) -> None:
    for name in ("qo_indptr", "kv_indptr", "kv_indices", "kv_last_page_len"):
        t = getattr(meta, name)
        assert t.dtype == torch.int32 and t.device == CPU and t.tolist() == ref[name], name
    for name in ("slot_mapping", "positions"):
        t = getattr(meta, name)
        assert t.dtype == torch.int64 and t.tolist() == ref[name], name
    assert meta.qo_indptr_host == ref["qo_indptr"] and meta.kv_lens_host == ref["kv_lens"]
    assert all(type(x) is int for x in meta.qo_indptr_host + meta.kv_lens_host)
    assert meta.page_size == ps
    assert meta.num_decode_only == all(b - a == 1 for a, b in
                                       zip(ref["qo_indptr"], ref["qo_indptr"][1:]))
    assert meta.num_cascade_reqs == num_cascade
    if "levels" not in ref:
        assert meta.cascade is None
        return
    assert len(meta.cascade) == 2
    for level, ref_level in zip(meta.cascade, ref["levels"]):
        for name, values in ref_level.items():
            t = getattr(level, name)
            assert t.dtype == torch.int32 and t.tolist() == values, name
            if name != "kv_indices":  # the small arrays have host mirrors, plain ints
                host = getattr(level, name + "_host")
                assert host == values and all(type(x) is int for x in host), name


# -- inputs ----------------------------------------------------------------------------------
def mirrored(tables: list[list[int]], rng: random.Random) -> PageRows:
    """The tables as a mirror holds them: scattered rows, other requests' pages left over."""
    mirror = BlockTableMirror(num_rows=2, width=2)
    junk = [Request(f"j{i}", [0], SamplingParams()) for i in range(rng.randrange(6))]
    for r in junk:
        r.block_table = [rng.randrange(10**6) for _ in range(rng.randrange(40))]
    reqs = []
    for i, t in enumerate(tables):
        reqs.append(Request(f"r{i}", [0], SamplingParams()))
        reqs[-1].block_table = list(t)
    mirror.sync(junk + reqs[::2])  # the junk leaves its rows behind with stale pages
    return mirror.sync(reqs)


def random_batch(rng: random.Random, ps: int, decode: bool):
    tables, done, new = [], [], []
    for _ in range(rng.randint(1, 9)):
        d = rng.randrange(0, 60)
        n = 1 if decode or rng.random() < 0.4 else rng.randint(1, 50)
        need = -(-(d + n) // ps)
        # pages past the KV (allocated ahead) must not show up
        tables.append([rng.randrange(5000) for _ in range(need + rng.randrange(3))])
        done.append(d)
        new.append(n)
    return tables, done, new


@pytest.mark.parametrize("seed", range(30))
def test_plain_and_mixed_batches_equal_reference(seed):
    rng = random.Random(seed)
    ps = rng.choice([1, 4, 16])
    tables, done, new = random_batch(rng, ps, decode=seed % 3 == 0)
    ref = ref_metadata(tables, done, new, ps)
    assert_meta_equal(build_metadata(tables, done, new, ps, CPU), ref, ps)
    assert_meta_equal(build_metadata(mirrored(tables, rng), done, new, ps, CPU), ref, ps)


def test_long_prefill_chunk_equals_reference():
    rng = random.Random(7)
    table = rng.sample(range(100_000), 700)
    ref = ref_metadata([table], [3000], [8000], 16)
    assert_meta_equal(build_metadata([table], [3000], [8000], 16, CPU), ref, 16)


def cascade_batch(rng: random.Random, ps: int):
    free = rng.sample(range(100_000), 3000)
    tables, lens = [], []
    for _ in range(rng.randint(1, 3)):  # groups, some diverging after a common first page
        shared = [free.pop() for _ in range(rng.randint(1, 8))]
        for _ in range(rng.randint(1, 5)):
            cut = rng.randint(1, len(shared)) if rng.random() < 0.3 else len(shared)
            mine = shared[:cut] + [free.pop() for _ in shared[cut:]]
            own_len = rng.randint(1, 3 * ps)
            tables.append(mine + [free.pop() for _ in range(-(-own_len // ps))])
            lens.append(len(mine) * ps + own_len)
    for _ in range(rng.randint(0, 3)):  # loners
        n = rng.randint(1, 5 * ps)
        tables.append([free.pop() for _ in range(-(-n // ps))])
        lens.append(n)
    perm = list(range(len(tables)))
    rng.shuffle(perm)
    return [tables[i] for i in perm], [lens[i] for i in perm]


@pytest.mark.parametrize("seed", range(30))
def test_cascade_plan_and_levels_equal_reference(seed):
    rng = random.Random(seed)
    ps = rng.choice([1, 4, 16])
    tables, lens = cascade_batch(rng, ps)
    rows = mirrored(tables, rng)
    plan = plan_cascade(rows, lens, ps, "on")
    assert plan_cascade(tables, lens, ps, "on") == plan  # lists and mirror rows agree
    ref = ref_plan(tables, lens, ps, "on")
    if ref is None:
        assert plan is None
        return
    assert plan.order == ref[0]
    assert [(g.members, g.num_shared_pages) for g in plan.groups] == ref[1]
    o = plan.order
    done, new = [lens[i] - 1 for i in o], [1] * len(o)
    expect = ref_metadata([tables[i] for i in o], done, new, ps,
                          [(len(m), s) for m, s in ref[1]])
    meta = build_metadata(rows.take(o), done, new, ps, CPU, plan)
    assert_meta_equal(meta, expect, ps, plan.num_cascade_reqs)
    assert_meta_equal(build_metadata([tables[i] for i in o], done, new, ps, CPU, plan), expect,
                      ps, plan.num_cascade_reqs)


def test_auto_rule_on_a_long_shared_prefix():
    """40-way sharing of 32K tokens pays; a group of 4 does not; the order follows groups."""
    ps = 16
    shared = list(range(2048))
    big = [shared + [10_000 + 3 * i, 10_001 + 3 * i] for i in range(40)]
    small = [[20_000] * 3 + [30_000 + i] for i in range(4)]
    tables = [big[0], small[0]] + big[1:] + small[1:]
    lens = [len(t) * ps - 3 for t in tables]
    plan = plan_cascade(mirrored(tables, random.Random(0)), lens, ps, "auto")
    ref = ref_plan(tables, lens, ps, "auto")
    assert [(g.members, g.num_shared_pages) for g in plan.groups] == ref[1] == [
        ([0] + list(range(2, 41)), 2048)]
    assert plan.order == ref[0] and plan.order[40:] == [1, 41, 42, 43]
    assert plan_cascade(tables, lens, ps, "off") is None


def test_table_shorter_than_its_kv_is_refused():
    with pytest.raises(ValueError):
        build_metadata([[1, 2]], [8], [1], 4, CPU)

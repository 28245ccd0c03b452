"""FlashInferBackend against the torch reference on random paged batches (bf16, GQA, page 16).

Every case draws fresh random pages, lengths and values; the reference is TorchBackend on the
same bf16 inputs (it computes in float32). Outputs must agree to a relative error of 1e-2, and
both backends must leave the KV pool bit-identical (they write the same bf16 K/V).
"""

from __future__ import annotations

import random

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("flashinfer")

from engine.attention.cascade import CascadeGroup, CascadePlan, plan_cascade  # noqa: E402
from engine.attention.flashinfer_backend import FlashInferBackend  # noqa: E402
from engine.attention.flashinfer_graphs import cascade_graph_groups  # noqa: E402
from engine.attention.flashinfer_plans import CascadeDecodePlan, WrapperPlan  # noqa: E402
from engine.attention.metadata import build_metadata  # noqa: E402
from engine.attention.torch_backend import TorchBackend  # noqa: E402
from engine.cuda_graph import toy_step  # noqa: E402

pytestmark = pytest.mark.gpu

HQ, HKV, D, PS = 32, 8, 128, 16
DEV = torch.device("cuda")
DT = torch.bfloat16
TOL = 1e-2


@pytest.fixture(scope="module")
def fi_backend() -> FlashInferBackend:
    backend = FlashInferBackend(num_q_heads=HQ, num_kv_heads=HKV, head_dim=D, dtype=DT,
                                device=DEV, page_size=PS)
    backend.warmup()
    return backend


def _torch_backend() -> TorchBackend:
    return TorchBackend(num_q_heads=HQ, num_kv_heads=HKV, head_dim=D, dtype=DT, device=DEV)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any()
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def random_tables(rng: random.Random, kv_lens: list[int], num_pages: int) -> list[list[int]]:
    """Disjoint random pages for each request (a random permutation of the pool)."""
    pages = list(range(num_pages))
    rng.shuffle(pages)
    tables, i = [], 0
    for n in kv_lens:
        k = -(-n // PS)
        tables.append(pages[i:i + k])
        i += k
    return tables


def _compare(fi: FlashInferBackend, tables, done, new, num_pages, cascade=None):
    """Run both backends on one step; return (relative error, pools equal, FlashInfer's plan)."""
    cache = torch.randn(num_pages, 2, PS, HKV, D, device=DEV).to(DT)
    ref_cache = cache.clone()
    t = sum(new)
    q = torch.randn(t, HQ, D, device=DEV).to(DT)
    k = torch.randn(t, HKV, D, device=DEV).to(DT)
    v = torch.randn(t, HKV, D, device=DEV).to(DT)
    meta = build_metadata(tables, done, new, PS, DEV, cascade)
    ref_plan = _torch_backend().plan(build_metadata(tables, done, new, PS, DEV))  # plain
    ref = ref_plan.forward(0, q, k, v, ref_cache)
    plan = fi.plan(meta)
    out = plan.forward(0, q, k, v, cache)
    torch.cuda.synchronize()
    assert out.shape == (t, HQ, D) and out.dtype == DT
    return rel_err(out, ref), torch.equal(cache, ref_cache), plan


@pytest.mark.parametrize("seed", range(4))
def test_prefill_mixed_with_cached_prefix(fi_backend, seed):
    rng = random.Random(seed)
    num_req = rng.randint(2, 6)
    done, new = [], []
    for _ in range(num_req):
        kind = rng.choice(["fresh", "cached", "decode"])
        done.append(0 if kind == "fresh" else rng.randint(1, 300))
        new.append(1 if kind == "decode" else rng.randint(1, 200))
    new[0] = max(new[0], 2)  # at least one real prefill chunk in the batch
    kv_lens = [c + n for c, n in zip(done, new)]
    num_pages = sum(-(-n // PS) for n in kv_lens) + 7
    err, same_pool, plan = _compare(fi_backend, random_tables(rng, kv_lens, num_pages), done, new,
                                    num_pages)
    assert isinstance(plan, WrapperPlan) and plan.wrapper is fi_backend.prefill
    assert err <= TOL
    assert same_pool


@pytest.mark.parametrize("seed", range(4))
def test_decode(fi_backend, seed):
    rng = random.Random(100 + seed)
    kv_lens = [rng.randint(1, 700) for _ in range(rng.randint(1, 40))]
    num_pages = sum(-(-n // PS) for n in kv_lens) + 3
    done = [n - 1 for n in kv_lens]
    err, same_pool, plan = _compare(fi_backend, random_tables(rng, kv_lens, num_pages), done,
                                    [1] * len(kv_lens), num_pages)
    assert isinstance(plan, WrapperPlan) and plan.wrapper is fi_backend.decode
    assert err <= TOL
    assert same_pool


def _shared_prefix_tables(rng: random.Random, groups: list[tuple[int, int]], loners: int):
    """Tables where each group's members share their first `shared` full pages."""
    num_pages = 4096
    free = list(range(num_pages))
    rng.shuffle(free)
    tables, kv_lens = [], []
    for size, shared_pages in groups:
        prefix = [free.pop() for _ in range(shared_pages)]
        for _ in range(size):
            n = shared_pages * PS + rng.randint(1, 90)
            tables.append(prefix + [free.pop() for _ in range(-(-n // PS) - shared_pages)])
            kv_lens.append(n)
    for _ in range(loners):
        n = rng.randint(1, 400)
        tables.append([free.pop() for _ in range(-(-n // PS))])
        kv_lens.append(n)
    order = list(range(len(tables)))
    rng.shuffle(order)  # the planner must regroup them
    return [tables[i] for i in order], [kv_lens[i] for i in order], num_pages


@pytest.mark.parametrize("seed", range(4))
def test_cascade_matches_plain(fi_backend, seed):
    rng = random.Random(200 + seed)
    groups = [(rng.randint(2, 9), rng.randint(1, 40)) for _ in range(rng.randint(1, 3))]
    tables, kv_lens, num_pages = _shared_prefix_tables(rng, groups, loners=rng.randint(0, 4))
    plan = plan_cascade(tables, kv_lens, PS, mode="on")
    assert plan is not None
    tables = [tables[i] for i in plan.order]
    kv_lens = [kv_lens[i] for i in plan.order]
    err, same_pool, fi_plan = _compare(fi_backend, tables, [n - 1 for n in kv_lens],
                                       [1] * len(kv_lens), num_pages, plan)
    assert isinstance(fi_plan, CascadeDecodePlan)
    assert fi_plan.num_cascade == plan.num_cascade_reqs
    assert err <= TOL
    assert same_pool


def _toy_cascade_meta(b: int):
    """The step a cascade graph is captured on (as engine/cuda_graph.py does): b rows, one
    group sharing page 0, so the shared level holds the bucket's most rows."""
    plan = CascadePlan(order=list(range(b)), groups=[CascadeGroup(list(range(b)), 1)])
    return build_metadata([[0, 0]] * b, [PS] * b, [1] * b, PS, DEV, plan)


def _capture(fi_backend, meta, b, q, k, v, cache, kind=None):
    plan = fi_backend.plan_cuda_graph(meta, b, kind)
    plan.forward(0, q, k, v, cache)  # warm
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = plan.forward(0, q, k, v, cache)
    return graph, out


def test_cuda_graph_replay_with_padding(fi_backend):
    """A captured decode step replayed for fewer requests than its bucket: padded rows (whose
    K/V differ from every real row's, as they do past the model's first layer) write only the
    scratch page, so no other byte of the pool differs from the reference step's."""
    num_pages = 300
    fi_backend.enable_cuda_graphs([4, 8], max_num_indices=8 * 64, scratch_page=num_pages)
    b = 8
    cache = torch.randn(num_pages + 1, 2, PS, HKV, D, device=DEV).to(DT)
    qkv = torch.randn(b, HQ + 2 * HKV, D, device=DEV).to(DT)  # fused layout, like the model
    q, k, v = qkv[:, :HQ], qkv[:, HQ:HQ + HKV], qkv[:, HQ + HKV:]
    graph, out = _capture(fi_backend, build_metadata([[0]] * b, [0] * b, [1] * b, PS, DEV), b,
                          q, k, v, cache)
    rng = random.Random(7)
    for n in (5, 8, 1):
        kv_lens = [rng.randint(1, 500) for _ in range(n)]
        tables = random_tables(rng, kv_lens, num_pages)
        done = [x - 1 for x in kv_lens]
        cache.copy_(torch.randn_like(cache, dtype=torch.float32).to(DT))
        ref_cache = cache.clone()
        fresh = torch.randn(n, HQ + 2 * HKV, D, device=DEV).to(DT)
        qkv[:n] = fresh
        qkv[n:] = torch.randn(b - n, HQ + 2 * HKV, D, device=DEV).to(DT)
        meta = build_metadata(tables, done, [1] * n, PS, DEV)
        ref = _torch_backend().plan(meta).forward(0, fresh[:, :HQ], fresh[:, HQ:HQ + HKV],
                                                  fresh[:, HQ + HKV:], ref_cache)
        assert fi_backend.can_graph(meta, b)
        fi_backend.plan_cuda_graph(meta, b)  # refills what the captured kernels read
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out[:n], ref) <= TOL
        assert torch.equal(cache[:num_pages], ref_cache[:num_pages])
        # padding rows wrote their K into the scratch page's first slot; the scatter has no
        # order among equal indices, so each element comes from one of them (run 31 saw mixes)
        scratch_k = cache[num_pages, 0, 0]
        if n < b:
            assert (scratch_k[None] == k[n:b]).any(dim=0).all()
        else:
            assert torch.equal(scratch_k, ref_cache[num_pages, 0, 0])


@pytest.mark.parametrize("seed", range(3))
def test_cascade_graph_replay_equals_eager_cascade_and_plain(fi_backend, seed):
    """A cascade step replayed through the bucket's captured cascade graph (own level, shared
    level, masked merge) gives the eager cascade's and plain attention's outputs on the real
    rows, and writes the same pool bytes outside the scratch page."""
    b = 8
    rng = random.Random(300 + seed)
    groups = [(rng.randint(2, 3), rng.randint(1, 40)) for _ in range(rng.randint(1, 2))]
    loners = rng.randint(0, b - sum(g for g, _ in groups))
    tables, kv_lens, num_pages = _shared_prefix_tables(rng, groups, loners)
    fi_backend.enable_cuda_graphs([b], max_num_indices=b * 64, scratch_page=num_pages)
    cache = torch.zeros(num_pages + 1, 2, PS, HKV, D, device=DEV, dtype=DT)
    qkv = torch.randn(b, HQ + 2 * HKV, D, device=DEV).to(DT)
    q, k, v = qkv[:, :HQ], qkv[:, HQ:HQ + HKV], qkv[:, HQ + HKV:]
    graph, out = _capture(fi_backend, _toy_cascade_meta(b), b, q, k, v, cache)
    plan = plan_cascade(tables, kv_lens, PS, mode="on")
    assert plan is not None and len(plan.groups) == len(groups)
    tables = [tables[i] for i in plan.order]
    kv_lens = [kv_lens[i] for i in plan.order]
    n = len(tables)
    done = [x - 1 for x in kv_lens]
    meta = build_metadata(tables, done, [1] * n, PS, DEV, plan)
    cache.copy_(torch.randn_like(cache, dtype=torch.float32).to(DT))
    ref_cache, eager_cache = cache.clone(), cache.clone()
    qkv.copy_(torch.randn_like(qkv, dtype=torch.float32).to(DT))
    fresh = qkv[:n].clone()
    fq, fk, fv = fresh[:, :HQ], fresh[:, HQ:HQ + HKV], fresh[:, HQ + HKV:]
    plain = _torch_backend().plan(build_metadata(tables, done, [1] * n, PS, DEV))
    ref = plain.forward(0, fq, fk, fv, ref_cache)
    assert fi_backend.can_graph(meta, b)
    fi_backend.plan_cuda_graph(meta, b)
    graph.replay()
    torch.cuda.synchronize()
    got = out[:n].clone()
    eager_plan = fi_backend.plan(meta)
    assert isinstance(eager_plan, CascadeDecodePlan)
    eager = eager_plan.forward(0, fq, fk, fv, eager_cache)
    torch.cuda.synchronize()
    assert rel_err(got, ref) <= TOL
    assert rel_err(got, eager) <= TOL
    assert torch.equal(cache[:num_pages], ref_cache[:num_pages])
    assert torch.equal(eager_cache[:num_pages], ref_cache[:num_pages])


def test_cascade_graph_refuses_more_groups_than_its_shared_level_holds(fi_backend):
    """Bucket 16's shared level has cascade_graph_groups(16) = 4 entries: 4 groups fit, 5 do
    not (that step runs eagerly: the runner asks can_graph first)."""
    assert cascade_graph_groups(16) == 4
    for num_groups, fits in ((4, True), (5, False)):
        tables, kv_lens, num_pages = _shared_prefix_tables(random.Random(9), [(2, 3)] * num_groups,
                                                           0)
        fi_backend.enable_cuda_graphs([16], max_num_indices=16 * 64, scratch_page=num_pages)
        plan = plan_cascade(tables, kv_lens, PS, mode="on")
        assert len(plan.groups) == num_groups
        meta = build_metadata([tables[i] for i in plan.order],
                              [kv_lens[i] - 1 for i in plan.order], [1] * len(tables), PS, DEV,
                              plan)
        assert fi_backend.can_graph(meta, 16) is fits


@pytest.mark.skipif(torch.cuda.get_device_capability()[0] != 9,
                    reason="split shared levels run FA3, Hopper's kernel")
def test_split_cascade_graph_replay_equals_the_fa2_graph_and_plain(fi_backend):
    """128 requests sharing a 32K-token prefix (split_shared_level.py's case): bucket 128's
    split graph (FA3 over 4 slices of the prefix) and its FA2 cascade graph, each captured on
    the runner's toy step, both give plain attention's outputs and pool bytes."""
    b = 128
    tables, kv_lens, num_pages = _shared_prefix_tables(random.Random(11), [(b, 2048)], 0)
    fi_backend.enable_cuda_graphs([b], max_num_indices=b * 2100, scratch_page=num_pages)
    kinds = fi_backend.cascade_graph_kinds(b)
    assert kinds == ("cascade", "cascade_split")
    cache = torch.zeros(num_pages + 1, 2, PS, HKV, D, device=DEV, dtype=DT)
    qkv = torch.randn(b, HQ + 2 * HKV, D, device=DEV).to(DT)
    q, k, v = qkv[:, :HQ], qkv[:, HQ:HQ + HKV], qkv[:, HQ + HKV:]
    toy = toy_step(b, True, PS, DEV)
    graphs = {kind: _capture(fi_backend, toy, b, q, k, v, cache, kind) for kind in kinds}
    plan = plan_cascade(tables, kv_lens, PS, mode="on")
    assert plan is not None and len(plan.groups) == 1
    tables = [tables[i] for i in plan.order]
    done = [kv_lens[i] - 1 for i in plan.order]
    meta = build_metadata(tables, done, [1] * b, PS, DEV, plan)
    start = torch.randn_like(cache, dtype=torch.float32).to(DT)
    qkv.copy_(torch.randn_like(qkv, dtype=torch.float32).to(DT))
    ref_cache = start.clone()
    fresh = qkv.clone()
    plain = _torch_backend().plan(build_metadata(tables, done, [1] * b, PS, DEV))
    ref = plain.forward(0, fresh[:, :HQ], fresh[:, HQ:HQ + HKV], fresh[:, HQ + HKV:], ref_cache)
    for kind, split_on in (("cascade_split", True), ("cascade", False)):
        fi_backend.graph_buffers.split_on = split_on
        assert fi_backend.can_graph(meta, b) and fi_backend.graph_kind(meta, b) == kind
        cache.copy_(start)
        fi_backend.plan_cuda_graph(meta, b)
        graph, out = graphs[kind]
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out, ref) <= TOL, kind
        assert torch.equal(cache[:num_pages], ref_cache[:num_pages]), kind
    fi_backend.graph_buffers.split_on = True

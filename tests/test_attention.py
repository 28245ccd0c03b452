"""Attention backends: the contract every backend keeps (construction by name, a plan per step,
CUDA graphs only where declared), and TorchBackend's numbers: paged attention equals dense
attention; cascade equals plain (fp32, 1e-5)."""

from __future__ import annotations

import inspect
import random
from importlib import import_module

import pytest
import torch

from engine.attention.base import AttentionPlan
from engine.attention.cascade import plan_cascade
from engine.attention.metadata import build_metadata
from engine.attention.registry import ATTENTION_BACKENDS, make_backend
from engine.attention.torch_backend import TorchBackend, attend
from engine.cuda_graph import CudaGraphRunner
from engine.kv_pool import KVPool
from engine.model import CausalLM
from engine.model_arch import ModelArch

HQ, HKV, D, PS = 8, 2, 16, 4
# Exactly the keywords the engine builds every backend with (engine/llm_engine.py).
ENGINE_KWARGS = dict(num_q_heads=HQ, num_kv_heads=HKV, head_dim=D, dtype=torch.float32,
                     device="cpu", page_size=PS, max_num_seqs=8)


def _backend() -> TorchBackend:
    return TorchBackend(**ENGINE_KWARGS)


def _run(backend, tables, done, new, cache, q, k, v, cascade=None):
    meta = build_metadata(tables, done, new, PS, torch.device("cpu"), cascade)
    plan = backend.plan(meta)
    assert isinstance(plan, AttentionPlan) and plan.meta is meta
    return plan.forward(0, q, k, v, cache)


# -- the contract -----------------------------------------------------------------------------
def test_make_backend_by_name():
    assert type(make_backend("torch", **ENGINE_KWARGS)) is TorchBackend
    with pytest.raises(ValueError) as err:
        make_backend("nope", **ENGINE_KWARGS)
    assert "'nope'" in str(err.value)
    assert all(repr(name) in str(err.value) for name in ATTENTION_BACKENDS)


@pytest.mark.parametrize("name", sorted(ATTENTION_BACKENDS))
def test_every_backend_takes_the_engine_keywords_and_no_others(name):
    module, cls = ATTENTION_BACKENDS[name].split(":")
    # Binding checks the signature alone: the flashinfer backend cannot be built without CUDA.
    inspect.signature(getattr(import_module(module), cls)).bind(**ENGINE_KWARGS)
    with pytest.raises(TypeError, match="page_sise"):
        make_backend(name, **ENGINE_KWARGS, page_sise=PS)


def test_torch_backend_has_no_cuda_graphs_and_the_graph_runner_refuses_it():
    backend = _backend()
    assert backend.supports_cuda_graphs is False
    meta = build_metadata([[0]], [0], [1], PS, torch.device("cpu"))
    for hook in (lambda: backend.enable_cuda_graphs([1, 2], 16, scratch_page=4),
                 lambda: backend.plan_cuda_graph(meta, 1), backend.max_graph_indices,
                 lambda: backend.can_graph(meta, 1)):
        with pytest.raises(NotImplementedError, match="TorchBackend"):
            hook()
    arch = ModelArch("LlamaForCausalLM", vocab_size=64, hidden_size=32, intermediate_size=64,
                     num_layers=1, num_heads=HQ, num_kv_heads=HKV, head_dim=D,
                     rms_norm_eps=1e-5, rope_theta=10000.0)
    pool = KVPool(arch, num_pages=4, page_size=PS, dtype=torch.float32, device="cpu")
    # Refused before any CUDA call, so this runs on a CPU-only machine.
    with pytest.raises(ValueError, match="TorchBackend attention backend does not support CUDA"):
        CudaGraphRunner(CausalLM(arch, max_positions=32), pool, backend, max_num_seqs=2,
                        device=torch.device("cpu"))


# -- the torch backend's numbers --------------------------------------------------------------
def test_paged_prefill_equals_dense_causal():
    torch.manual_seed(0)
    num_pages = 32
    cache = torch.randn(num_pages, 2, PS, HKV, D)
    pages = list(range(num_pages))
    random.Random(0).shuffle(pages)
    # request 0: 5 cached + 6 new; request 1: 0 cached + 9 new; request 2: decode at 13
    tables = [pages[0:3], pages[3:6], pages[6:10]]
    done, new = [5, 0, 13], [6, 9, 1]
    t = sum(new)
    q, k, v = torch.randn(t, HQ, D), torch.randn(t, HKV, D), torch.randn(t, HKV, D)
    out = _run(_backend(), tables, done, new, cache, q, k, v)
    start = 0
    for table, c, n in zip(tables, done, new):
        kv = cache[table].transpose(0, 1).reshape(2, -1, HKV, D)[:, : c + n]
        # the new K/V were written into the pool before attention
        assert torch.equal(kv[0, c:], k[start:start + n])
        assert torch.equal(kv[1, c:], v[start:start + n])
        ref, _ = attend(q[start:start + n], kv[0], kv[1], D ** -0.5, causal=True)
        # dense reference by hand: softmax over allowed keys
        qh = q[start:start + n].view(n, HKV, HQ // HKV, D)
        s = torch.einsum("nhgd,mhd->nhgm", qh, kv[0]) * D ** -0.5
        mask = torch.arange(c + n)[None, :] <= (torch.arange(n)[:, None] + c)
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
        dense = torch.einsum("nhgm,mhd->nhgd", s.softmax(-1), kv[1]).reshape(n, HQ, D)
        torch.testing.assert_close(ref, dense, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out[start:start + n], dense, rtol=1e-5, atol=1e-6)
        start += n


def test_prefill_attention_takes_sdpas_fused_cpu_kernel_not_its_math_fallback():
    # On CPU, scaled_dot_product_attention runs 3-D inputs through its math fallback, 2.6-4.8x
    # slower than its flash kernel (docs/cpu-benchmarks.md); `attend` passes 4-D ones. Both the
    # causal case (n == m) and a chunk after cached tokens (an explicit mask) must take it.
    torch.manual_seed(2)
    for n, m in ((9, 9), (6, 11)):
        q, k, v = torch.randn(n, HQ, D), torch.randn(m, HKV, D), torch.randn(m, HKV, D)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            attend(q, k, v, D ** -0.5, causal=True, with_lse=False)
        ops = {e.key for e in prof.key_averages()}
        assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops, sorted(ops)
        assert "aten::_scaled_dot_product_attention_math" not in ops


def test_batched_decodes_equal_dense_per_request():
    # Five single-token requests of different lengths in one step: the torch backend attends
    # them as one batch, padded to the longest (13 pages' worth) and masked; each row must
    # equal its own request's dense attention, whatever its padding holds.
    torch.manual_seed(1)
    lens = [1, 4, 5, 13, 50]
    pages = list(range(40))
    random.Random(1).shuffle(pages)
    tables, start = [], 0
    for n in lens:
        tables.append(pages[start:start + -(-n // PS)])
        start += len(tables[-1])
    cache = torch.randn(40, 2, PS, HKV, D)
    b = len(lens)
    q, k, v = torch.randn(b, HQ, D), torch.randn(b, HKV, D), torch.randn(b, HKV, D)
    out = _run(_backend(), tables, [n - 1 for n in lens], [1] * b, cache, q, k, v)
    for i, (table, n) in enumerate(zip(tables, lens)):
        kv = cache[table].transpose(0, 1).reshape(2, -1, HKV, D)[:, :n]
        assert torch.equal(kv[0, -1], k[i]) and torch.equal(kv[1, -1], v[i])
        qh = q[i].view(HKV, HQ // HKV, D)
        s = torch.einsum("hgd,mhd->hgm", qh, kv[0]) * D ** -0.5
        dense = torch.einsum("hgm,mhd->hgd", s.softmax(-1), kv[1]).reshape(HQ, D)
        torch.testing.assert_close(out[i], dense, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_cascade_equals_plain_decode(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    num_pages = 400
    free = list(range(num_pages))
    rng.shuffle(free)
    tables, lens = [], []
    for _ in range(rng.randint(1, 3)):  # groups sharing a prefix
        shared = [free.pop() for _ in range(rng.randint(1, 6))]
        for _ in range(rng.randint(2, 5)):
            own_len = rng.randint(1, 11)
            own = [free.pop() for _ in range(-(-own_len // PS))]
            tables.append(shared + own)
            lens.append(len(shared) * PS + own_len)
    for _ in range(rng.randint(0, 3)):  # loners
        n = rng.randint(1, 20)
        tables.append([free.pop() for _ in range(-(-n // PS))])
        lens.append(n)
    perm = list(range(len(tables)))
    rng.shuffle(perm)
    tables, lens = [tables[i] for i in perm], [lens[i] for i in perm]
    plan = plan_cascade(tables, lens, PS, mode="on")
    assert plan is not None and plan.num_cascade_reqs >= 2
    tables = [tables[i] for i in plan.order]
    lens = [lens[i] for i in plan.order]
    b = len(tables)
    cache = torch.randn(num_pages, 2, PS, HKV, D)
    q, k, v = torch.randn(b, HQ, D), torch.randn(b, HKV, D), torch.randn(b, HKV, D)
    done = [n - 1 for n in lens]
    plain = _run(_backend(), tables, done, [1] * b, cache.clone(), q, k, v)
    cascade = _run(_backend(), tables, done, [1] * b, cache.clone(), q, k, v, plan)
    assert (cascade - plain).abs().max().item() <= 1e-5


def test_cascade_planner_groups_and_rule():
    # three requests share pages [7, 8]; one does not; page 9 holds nobody's newest token
    tables = [[7, 8, 1], [5, 6], [7, 8, 2], [7, 8, 3, 4]]
    lens = [9, 6, 10, 13]
    plan = plan_cascade(tables, lens, 4, mode="on")
    assert plan.order == [0, 2, 3, 1]
    assert [(g.members, g.num_shared_pages) for g in plan.groups] == [([0, 2, 3], 2)]
    # a shared page that would hold a member's newest token is not shared
    plan = plan_cascade([[7, 8], [7, 8, 3]], [8, 9], 4, mode="on")
    assert plan.groups[0].num_shared_pages == 1
    assert plan_cascade(tables, lens, 4, mode="off") is None
    assert plan_cascade(tables, lens, 4, mode="auto") is None  # too small to pay

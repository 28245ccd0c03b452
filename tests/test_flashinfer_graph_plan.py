"""FlashInferBackend's CUDA-graph planning, run on the CPU against a stand-in for FlashInfer's
graph-mode wrappers: what a replay computes equals plain attention.

The stand-in keeps the graph-mode rules that matter here: a wrapper's batch size is fixed by its
buffers, the first plan (the capture's) fixes the most query rows, indices must fit the buffer,
and `run` reads the buffers when it runs, as a replayed kernel does. A graph is "captured" by
planning the runner's toy step and keeping that plan; a "replay" is the kept plan's `forward`
after `plan_cuda_graph` refilled the buffers for a real step. Attention inside is the torch
reference's, so only the backend's glue (which buffers, which rows, padding, the merge mask)
is under test; the kernels themselves are tests/gpu's.
"""

from __future__ import annotations

import random
import types

import pytest
import torch

from engine.attention import flashinfer_backend as fb
from engine.attention import flashinfer_plans as plans
from engine.attention.base import AttentionBackend
from engine.attention.cascade import CascadeGroup, CascadePlan, plan_cascade
from engine.attention.metadata import build_metadata
from engine.attention.torch_backend import TorchBackend, attend, gather_kv, merge_states
from engine.attention.xqa_decode import (
    XQADecode,
    XQAKernels,
    decode_kernels,
    table_positions,
)
from tests.test_graph_levels import shared_prefix_batch

HQ, HKV, D, PS = 4, 2, 8, 4
CPU = torch.device("cpu")
NUM_PAGES = 200  # the scratch page is NUM_PAGES, as KVPool adds it


class StandInWrapper:
    """FlashInfer's paged prefill / decode wrapper, as far as the backend's graphs use it."""

    def __init__(self, workspace, layout, use_cuda_graph=False, qo_indptr_buf=None,
                 paged_kv_indptr_buf=None, paged_kv_indices_buf=None,
                 paged_kv_last_page_len_buf=None, backend="auto", use_tensor_cores=False,
                 paged_kv_indptr_buffer=None, paged_kv_indices_buffer=None,
                 paged_kv_last_page_len_buffer=None, decode=False):
        self.graph = use_cuda_graph
        self.decode = decode
        self.qo_buf = qo_indptr_buf
        self.kv_indptr = paged_kv_indptr_buf if not decode else paged_kv_indptr_buffer
        self.kv_indices = paged_kv_indices_buf if not decode else paged_kv_indices_buffer
        self.last = paged_kv_last_page_len_buf if not decode else paged_kv_last_page_len_buffer
        self.max_rows = None

    def plan(self, *args, causal=False, uniform_q_len=None, **kwargs):
        if self.decode:  # (kv_indptr, indices, last, heads...): one query per request
            kv_indptr, indices, last, *heads = args
            qo = torch.arange(len(kv_indptr), dtype=torch.int32)
        else:
            qo, kv_indptr, indices, last, *heads = args
        assert tuple(heads) == (HQ, HKV, D, PS)
        self.causal = causal or self.decode
        if uniform_q_len is not None:
            assert (qo[1:] - qo[:-1]).eq(uniform_q_len).all()
        if not self.graph:
            self.qo, self.kv_indptr, self.kv_indices, self.last = qo, kv_indptr, indices, last
            return
        assert len(kv_indptr) == len(self.kv_indptr) and len(last) == len(self.last)
        assert len(qo) == len(self.kv_indptr) and len(indices) <= len(self.kv_indices)
        rows = int(qo[-1])
        self.max_rows = rows if self.max_rows is None else self.max_rows
        assert rows <= self.max_rows  # the capture's plan fixed the most rows
        if self.qo_buf is not None:
            self.qo_buf.copy_(qo)
        self.qo = qo if self.qo_buf is None else self.qo_buf
        self.kv_indptr.copy_(kv_indptr)
        self.last.copy_(last)
        self.kv_indices[:len(indices)].copy_(indices)

    def run(self, q, cache, return_lse=False):
        qo, kv_indptr, last = self.qo.tolist(), self.kv_indptr.tolist(), self.last.tolist()
        out = torch.full((q.shape[0], HQ, D), float("nan"))  # rows of no entry: never written
        lse = torch.full((q.shape[0], HQ), float("nan"))
        for e in range(len(last)):
            lo, hi = qo[e], qo[e + 1]
            if hi > lo:
                pages = self.kv_indices[kv_indptr[e]:kv_indptr[e + 1]].long()
                k, v = gather_kv(cache, pages, (len(pages) - 1) * PS + last[e])
                out[lo:hi], lse[lo:hi] = attend(q[lo:hi], k, v, D ** -0.5, self.causal)
        return (out, lse) if return_lse else out


def _merge_state_in_place(v, s, v_other, s_other, mask=None):
    merged, merged_lse = merge_states(v, s, v_other, s_other)
    rows = torch.ones(v.shape[0], dtype=torch.bool) if mask is None else mask.bool()
    v[rows], s[rows] = merged[rows], merged_lse[rows]


def _append_paged_kv_cache(k, v, batch_indices, positions, cache, kv_indices, kv_indptr,
                           kv_last_page_len):
    """FlashInfer's documented semantics: token i goes to position positions[i] of request
    batch_indices[i], i.e. page kv_indices[kv_indptr[b] + pos // page_size] at pos % page_size,
    a position its pages and last-page length hold."""
    for i in range(k.shape[0]):
        b, pos = int(batch_indices[i]), int(positions[i])
        lo, hi = int(kv_indptr[b]), int(kv_indptr[b + 1])
        assert 0 <= pos < (hi - lo - 1) * PS + int(kv_last_page_len[b])
        page = int(kv_indices[lo + pos // PS])
        cache[page, 0, pos % PS], cache[page, 1, pos % PS] = k[i], v[i]


STAND_IN = types.SimpleNamespace(
    BatchPrefillWithPagedKVCacheWrapper=StandInWrapper,
    BatchDecodeWithPagedKVCacheWrapper=lambda *a, **k: StandInWrapper(*a, decode=True, **k),
    merge_state_in_place=_merge_state_in_place,
    append_paged_kv_cache=_append_paged_kv_cache)


def _backend() -> fb.FlashInferBackend:
    """The backend over the stand-in (its constructor needs CUDA: the fields it sets, here)."""
    be = object.__new__(fb.FlashInferBackend)
    AttentionBackend.__init__(be, HQ, HKV, D, torch.float32, "cpu", PS, 16)
    be._fi, be.workspace = STAND_IN, torch.zeros(8)
    be.prefill = StandInWrapper(be.workspace, "NHD")
    be.decode = StandInWrapper(be.workspace, "NHD", decode=True)
    be.cascade = plans.TwoLevelCascade(STAND_IN, be.workspace, "fa2")
    be.cascade_backend, be.graph_buffers = "fa2", None
    be._rows = torch.arange(1, dtype=torch.int32)
    be.xqa = None  # FA2 decodes fp8 pages (fp8_decode_kernels: None)
    return be


def _toy_step(b: int, cascade: bool):
    """engine/cuda_graph.py's capture steps."""
    if not cascade:
        return build_metadata([[0]] * b, [0] * b, [1] * b, PS, CPU)
    plan = CascadePlan(list(range(b)), [CascadeGroup(list(range(b)), 1)])
    return build_metadata([[0, 0]] * b, [PS] * b, [1] * b, PS, CPU, plan)


@pytest.mark.parametrize("cascade", [False, True])
@pytest.mark.parametrize("seed", range(8))
def test_replayed_graph_step_equals_plain_attention(cascade, seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    b = 8
    be = _backend()
    be.enable_cuda_graphs([4, b], max_num_indices=b * 30, scratch_page=NUM_PAGES)
    cache = torch.zeros(NUM_PAGES + 1, 2, PS, HKV, D)
    captured = be.plan_cuda_graph(_toy_step(b, cascade), b)
    kv = torch.randn(b, 2, HKV, D)
    captured.forward(0, torch.randn(b, HQ, D), kv[:, 0], kv[:, 1], cache)
    # 1-2 groups and loners, at most b requests
    tables, lens = shared_prefix_batch(rng, NUM_PAGES, max_groups=2, max_members=3, max_requests=b)
    plan = plan_cascade(tables, lens, PS, mode="on") if cascade else None
    if plan is not None:
        tables, lens = [tables[i] for i in plan.order], [lens[i] for i in plan.order]
    n, done = len(tables), [x - 1 for x in lens]
    meta = build_metadata(tables, done, [1] * n, PS, CPU, plan)
    assert (meta.cascade is not None) == cascade
    cache = torch.randn(NUM_PAGES + 1, 2, PS, HKV, D)
    ref_cache = cache.clone()
    q, kv = torch.randn(b, HQ, D), torch.randn(b, 2, HKV, D)
    plain = TorchBackend(HQ, HKV, D, torch.float32, "cpu", PS)
    ref = plain.plan(build_metadata(tables, done, [1] * n, PS, CPU)).forward(
        0, q[:n], kv[:n, 0], kv[:n, 1], ref_cache)
    assert be.can_graph(meta, b)
    be.plan_cuda_graph(meta, b)
    out = captured.forward(0, q, kv[:, 0], kv[:, 1], cache)  # the replay: the capture's plan
    assert (out[:n] - ref).abs().max().item() <= 1e-5
    assert torch.equal(cache[:NUM_PAGES], ref_cache[:NUM_PAGES])  # padding: scratch page only
    if n < b:
        assert any(torch.equal(cache[NUM_PAGES, 0, 0], kv[i, 0]) for i in range(n, b))


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float8_e4m3fn])
def test_eager_step_stores_each_token_where_the_torch_backend_does(kv_dtype):
    """A prefill chunk over a cached prefix and a decode token: K/V go through the append
    kernel (each token a one-page request), converted first for an fp8 pool (saturated, one
    kernel for K and V); either way the pool ends as the torch backend leaves it."""
    torch.manual_seed(0)
    be = _backend()
    tables, done, new = [[7, 3, 11], [5, 2]], [PS + 1, PS], [6, 1]
    meta = build_metadata(tables, done, new, PS, CPU)
    t = sum(new)
    q, kv = torch.randn(t, HQ, D), torch.randn(t, 2, HKV, D)
    cache = torch.randn(NUM_PAGES, 2, PS, HKV, D).to(kv_dtype)
    ref_cache = cache.clone()
    plain = TorchBackend(HQ, HKV, D, torch.float32, "cpu", PS, kv_dtype=kv_dtype)
    plain.plan(meta).forward(0, q, kv[:, 0], kv[:, 1], ref_cache)
    be.kv_dtype = kv_dtype
    plan = be.plan(meta)
    # positions 5..10 of the first request (pages 3, 11 at page size 4), 4 of the second
    assert plan.write.page.dtype == torch.int32
    assert plan.write.page.tolist() == [3, 3, 3, 11, 11, 11, 2]
    assert plan.write.offset.tolist() == [1, 2, 3, 0, 1, 2, 0]
    appended = []
    plan.write.append = lambda k, v, *rest: (appended.append((k.dtype, v.dtype)),
                                            _append_paged_kv_cache(k, v, *rest))
    plan.write(cache, kv[:, 0], kv[:, 1])
    assert appended == [(kv_dtype, kv_dtype)]  # one append, of the pool's dtype
    assert torch.equal(cache.view(torch.uint8), ref_cache.view(torch.uint8))


# -- plain decode over fp8 pages through XQA (engine/attention/xqa_decode.py) -----------------
def _xqa_op(gmma, sm_count, num_kv_heads, sliding_win, q_scale, out, rcp_out_scale, q, sinks,
            k_cache, v_cache, k_sf, v_sf, page_table, max_seq_len, seq_lens, batch_size,
            kv_scale, semaphores, scratch, enable_pdl, q_seq_len, q_cu_seq_lens, mask):
    """XQA's documented semantics: row r attends over the first seq_lens[r] tokens of the pages
    page_table[r, 0], page_table[r, 1], ... (max_seq_len = the table's width in tokens)."""
    assert page_table.dtype == torch.int32 and seq_lens.dtype == torch.uint32
    assert max_seq_len == page_table.shape[1] * PS and page_table.shape[0] == batch_size
    assert q.is_contiguous() and out.is_contiguous() and q.shape[:2] == (batch_size, 1)
    assert (q_scale, kv_scale, num_kv_heads, sliding_win, q_seq_len) == (1.0, 1.0, HKV, 0, 1)
    lens = seq_lens.view(torch.int32)[:, 0].tolist()
    for r, n in enumerate(lens):
        pages = page_table[r, :-(-n // PS)].long()
        k = k_cache[pages].float().flatten(0, 1)[:n]  # [n, Hkv, D]
        v = v_cache[pages].float().flatten(0, 1)[:n]
        out[r] = attend(q[r].float(), k, v, D ** -0.5, causal=True)[0].to(out.dtype)


def _get_xqa_module(dtype, kv_dtype, page_size, head_dim, group, sliding, out_dtype, q_len):
    assert (page_size, head_dim, group, sliding, q_len) == (PS, D, HQ // HKV, False, 1)
    return types.SimpleNamespace(xqa=_xqa_op)


def _xqa_backend() -> fb.FlashInferBackend:
    """The backend over fp8 pages with XQA for plain decode (the stand-in for its kernel)."""
    be = _backend()
    be.kv_dtype = torch.float8_e4m3fn
    be.xqa = XQAKernels(_get_xqa_module, "gmma", torch.float32, be.kv_dtype, HQ, HKV, D, PS,
                        be.max_num_seqs, CPU)
    return be


def test_fp8_store_input_is_k_then_v_per_row_saturated_to_e4m3_s_range():
    torch.manual_seed(0)
    qkv = torch.randn(3, HQ * D + 2 * HKV * D) * 300  # some values beyond e4m3's 448
    k = qkv[:, HQ * D:HQ * D + HKV * D].view(3, HKV, D)
    v = qkv[:, HQ * D + HKV * D:].view(3, HKV, D)
    rows = torch.cat([k.reshape(3, -1), v.reshape(3, -1)], dim=1)
    side_by_side = plans._side_by_side(k, v)
    assert side_by_side.data_ptr() == k.data_ptr()  # a view of the fused qkv output
    assert torch.equal(side_by_side, rows)
    assert torch.equal(plans._side_by_side(k.clone(), v.clone()), rows)  # apart: a copy
    fp8 = plans.to_fp8_rows(side_by_side)
    assert fp8.dtype == torch.float8_e4m3fn and fp8.float().abs().max().item() == 448.0
    assert torch.equal(fp8.float(), rows.clamp(-448, 448).to(torch.float8_e4m3fn).float())


def test_table_positions_place_each_request_s_pages_in_its_row():
    # 3 pages (9 tokens), 1 page (4 tokens), 2 pages (5 tokens) into rows of width 4
    assert table_positions([9, 4, 5], PS, 4).tolist() == [0, 1, 2, 4, 8, 9]


@pytest.mark.parametrize("seed", range(4))
def test_fp8_decode_through_xqa_eager_and_replayed_equals_plain_attention(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    be, b = _xqa_backend(), 8
    be.enable_cuda_graphs([4, b], max_num_indices=b * 30, scratch_page=NUM_PAGES)
    assert be.graph_buffers.xqa.table.shape == (b, 30)
    fp8 = torch.float8_e4m3fn
    cache = torch.zeros(NUM_PAGES + 1, 2, PS, HKV, D, dtype=fp8)
    captured = be.plan_cuda_graph(_toy_step(b, cascade=False), b)
    assert isinstance(captured.wrapper, XQADecode)
    n = rng.randint(1, b)
    lens = [rng.randint(1, 60) for _ in range(n)]
    pages = rng.sample(range(NUM_PAGES), sum(-(-x // PS) for x in lens))
    tables = [[pages.pop() for _ in range(-(-x // PS))] for x in lens]
    meta = build_metadata(tables, [x - 1 for x in lens], [1] * n, PS, CPU)
    plain = TorchBackend(HQ, HKV, D, torch.float32, "cpu", PS, kv_dtype=fp8)
    q, kv = torch.randn(b, HQ, D), torch.randn(b, 2, HKV, D)
    cache = torch.randn(NUM_PAGES + 1, 2, PS, HKV, D).to(fp8)
    ref_cache = cache.clone()
    ref = plain.plan(meta).forward(0, q[:n], kv[:n, 0], kv[:n, 1], ref_cache)
    # eager: a plan of its own, rows = the requests
    eager_cache = cache.clone()
    plan = be.plan(meta)
    assert isinstance(plan.wrapper, XQADecode) and plan.wrapper.rows == n
    assert (plan.forward(0, q[:n], kv[:n, 0], kv[:n, 1], eager_cache) - ref).abs().max() <= 1e-5
    assert torch.equal(eager_cache.view(torch.uint8), ref_cache.view(torch.uint8))
    # replay: the capture's plan after plan_cuda_graph refilled the fixed table and lengths
    assert be.can_graph(meta, b)
    be.plan_cuda_graph(meta, b)
    x = be.graph_buffers.xqa
    for r, t in enumerate(tables):
        assert x.table[r, :len(t)].tolist() == t
    assert x.table[n:, 0].tolist() == [NUM_PAGES] * (b - n)  # padding: the scratch page
    assert x.lens.tolist() == lens + [1] * (b - n)
    out = captured.forward(0, q, kv[:, 0], kv[:, 1], cache)
    assert (out[:n] - ref).abs().max().item() <= 1e-5
    assert torch.equal(cache[:NUM_PAGES].view(torch.uint8), ref_cache[:NUM_PAGES].view(torch.uint8))


def test_a_step_longer_than_the_xqa_table_runs_eagerly():
    be = _xqa_backend()
    be.enable_cuda_graphs([4], max_num_indices=4 * 3, scratch_page=NUM_PAGES)  # 3 pages a row
    meta = build_metadata([[1, 2, 3, 4]], [4 * PS - 1], [1], PS, CPU)
    assert not be.can_graph(meta, 4)
    assert isinstance(be.plan(meta).wrapper, XQADecode)  # eager buffers grow to fit


def test_decode_kernel_choice(caplog, monkeypatch):
    args = (torch.float32, torch.float8_e4m3fn, HQ, HKV, D, PS, 16, CPU)
    with pytest.raises(ValueError, match=r"unknown fp8 decode kernel 'xqa'; valid: \['gmma'"):
        decode_kernels("xqa", _get_xqa_module, *args)
    assert decode_kernels("fa2", _get_xqa_module, *args) is None
    assert decode_kernels("generic", _get_xqa_module, *args).kernel == "generic"
    same_dtype = (torch.float32, torch.float32, *args[2:])
    assert decode_kernels("generic", _get_xqa_module, *same_dtype) is None
    monkeypatch.setenv("PDSERVE_FP8_DECODE", "fa2")
    assert decode_kernels(None, _get_xqa_module, *args) is None

    def missing_sources(*a):
        raise RuntimeError("no csrc/xqa")

    assert decode_kernels("generic", missing_sources, *args) is None
    assert "stays on FlashInfer's FA2 kernel" in caplog.text and "no csrc/xqa" in caplog.text

"""fp8 on the GPU: FlashInfer over fp8 pages against the torch reference over the same pages
(prefill, decode, cascade, a CUDA-graph replay; head_dim 64 and 128), the fp8 GEMM's error
bound and its capture in a CUDA graph, and the tiny model (head_dim 64) with fp8 weights and
KV agreeing between the two attention backends.

FlashInfer reads fp8 K/V with k_scale = v_scale = 1.0 and computes in bf16/fp32; the reference
upcasts the same fp8 bytes to float32, so the two differ by the kernels' rounding only (the
bf16 tolerance), and both must write identical fp8 bytes into the pool. Plain decode's kernels
(engine/attention/xqa_decode.py) run each: FA2 and XQA's generic kernel in bf16 math, XQA's
Hopper kernel (the default) in fp8 math, held to the fp8 bound."""

from __future__ import annotations

import math
import random

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("flashinfer")

from engine import fp8_fusion, fp8_linear  # noqa: E402
from engine.attention.cascade import plan_cascade  # noqa: E402
from engine.attention.flashinfer_backend import FlashInferBackend  # noqa: E402
from engine.attention.metadata import build_metadata  # noqa: E402
from engine.attention.torch_backend import TorchBackend  # noqa: E402
from engine.fp8_linear import Fp8Linear  # noqa: E402
from engine.llm import LLM  # noqa: E402
from engine.model import RMSNorm  # noqa: E402
from tests.gpu import test_gpu_engine as gpu_engine  # noqa: E402
from tests.gpu.test_flashinfer_backend import random_tables, rel_err  # noqa: E402
from tests.test_fp8 import agreement  # noqa: E402

tiny_path = gpu_engine.tiny_path  # the head_dim-64 tiny llama (a module-scoped fixture)

pytestmark = pytest.mark.gpu

FP8 = torch.float8_e4m3fn
DEV = torch.device("cuda")
DT = torch.bfloat16
HQ, HKV, PS = 32, 8, 16
TOL = 2e-2  # bf16 attention over identical fp8 K/V (bf16 runs hold 1e-2; fp8 adds no error)
# XQA's Hopper fp8 kernel also rounds the queries and the softmax weights to e4m3 (3 mantissa
# bits, as the fp8 GEMM's operands): its outputs were 3.3-3.6% off bf16 math in run 77.
FP8_MATH_TOL = 6e-2
FP8_MATH_TIE = 1.0  # nats, the KL bound of fp8 weights on this model (tests/test_fp8.py)
# The plain fp8 decode kernels (xqa_decode.FP8_DECODE_KERNELS) and their bounds.
DECODE_TOL = {"fa2": TOL, "generic": TOL, "gmma": FP8_MATH_TOL}
FP8_GEMM_REL_ERR = 0.06  # as on CPU (tests/test_fp8.py): 3 mantissa bits per operand


def backends(d: int, fp8_decode: str = "fa2") -> tuple[FlashInferBackend, TorchBackend]:
    kw = dict(num_q_heads=HQ, num_kv_heads=HKV, head_dim=d, dtype=DT, device=DEV,
              page_size=PS, kv_dtype=FP8)
    fi = FlashInferBackend(**kw, fp8_decode=fp8_decode)
    # not a fallback (XQA failing to build is logged, and FA2 decodes)
    assert (fi.xqa.kernel if fi.xqa else "fa2") == fp8_decode
    fi.warmup()
    return fi, TorchBackend(**kw)


def compare(fi, ref, d, tables, done, new, num_pages, cascade=None) -> tuple[float, bool]:
    cache = (torch.randn(num_pages, 2, PS, HKV, d, device=DEV) * 2).to(FP8)
    ref_cache = cache.clone()
    t = sum(new)
    q, k, v = (torch.randn(t, h, d, device=DEV).to(DT) for h in (HQ, HKV, HKV))
    want = ref.plan(build_metadata(tables, done, new, PS, DEV)).forward(0, q, k, v, ref_cache)
    got = fi.plan(build_metadata(tables, done, new, PS, DEV, cascade)).forward(0, q, k, v, cache)
    torch.cuda.synchronize()
    assert got.dtype == DT and cache.dtype == FP8
    return rel_err(got, want), torch.equal(cache.view(torch.uint8), ref_cache.view(torch.uint8))


@pytest.mark.parametrize("kernel", ["fa2", "generic", "gmma"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("seed", range(3))
def test_flashinfer_over_fp8_pages_matches_the_torch_reference(d, seed, kernel):
    fi, ref = backends(d, kernel)
    rng = random.Random(seed)
    # a prefill batch (fresh, cached prefix, a decode row), then a decode-only batch
    done, new = [0, rng.randint(1, 300), rng.randint(1, 300)], [rng.randint(2, 200),
                                                                rng.randint(1, 100), 1]
    lens = [a + b for a, b in zip(done, new)]
    n = sum(-(-x // PS) for x in lens) + 5
    err, same = compare(fi, ref, d, random_tables(rng, lens, n), done, new, n)
    assert err <= TOL and same
    lens = [rng.randint(1, 700) for _ in range(rng.randint(1, 30))]
    n = sum(-(-x // PS) for x in lens) + 3
    err, same = compare(fi, ref, d, random_tables(rng, lens, n), [x - 1 for x in lens],
                        [1] * len(lens), n)
    assert err <= DECODE_TOL[kernel] and same


def test_cascade_over_fp8_pages_matches_plain_reference():
    fi, ref = backends(128)
    rng = random.Random(5)
    prefix = list(range(20))
    tables, lens = [], []
    for i in range(6):
        n = 20 * PS + rng.randint(1, 60)
        tables.append(prefix + [100 + 10 * i + j for j in range(-(-n // PS) - 20)])
        lens.append(n)
    plan = plan_cascade(tables, lens, PS, mode="on")
    assert plan is not None and plan.num_cascade_reqs == 6
    err, same = compare(fi, ref, 128, tables, [x - 1 for x in lens], [1] * 6, 200, plan)
    assert err <= TOL and same


@pytest.mark.parametrize("kernel", ["fa2", "generic", "gmma"])
def test_cuda_graph_decode_over_fp8_pages(kernel):
    fi, ref = backends(128, kernel)
    fi.enable_cuda_graphs([8], max_num_indices=8 * 64, scratch_page=300)
    cache = torch.zeros(301, 2, PS, HKV, 128, device=DEV, dtype=FP8)  # page 300: the scratch
    q, k, v = (torch.randn(8, h, 128, device=DEV).to(DT) for h in (HQ, HKV, HKV))
    plan = fi.plan_cuda_graph(build_metadata([[0]] * 8, [0] * 8, [1] * 8, PS, DEV), 8)
    plan.forward(0, q, k, v, cache)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = plan.forward(0, q, k, v, cache)
    rng = random.Random(9)
    lens = [rng.randint(1, 500) for _ in range(6)]
    tables = random_tables(rng, lens, 300)
    cache.copy_((torch.randn(cache.shape, device=DEV) * 2).to(FP8))
    ref_cache = cache.clone()
    meta = build_metadata(tables, [x - 1 for x in lens], [1] * 6, PS, DEV)
    want = ref.plan(meta).forward(0, q[:6], k[:6], v[:6], ref_cache)
    fi.plan_cuda_graph(meta, 8)
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(out[:6], want) <= DECODE_TOL[kernel]
    # the two padding rows wrote their K/V into the scratch page only
    assert torch.equal(cache[:300].view(torch.uint8), ref_cache[:300].view(torch.uint8))


@pytest.mark.parametrize("m", [1, 32, 128, 512])
def test_fp8_gemm_error_bound_and_cuda_graph_capture(m):
    torch.manual_seed(m)
    lin = torch.nn.Linear(4096, 6144, bias=False, device=DEV, dtype=DT)
    fp8 = Fp8Linear.from_linear(lin)
    x = torch.randn(m, 4096, device=DEV, dtype=DT)
    ref = lin(x)
    eager = fp8(x)
    assert rel_err(eager, ref) < FP8_GEMM_REL_ERR
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fp8(x)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(captured, lin(x)) < FP8_GEMM_REL_ERR
    assert m < fp8_linear.ROWWISE_MIN_M or rel_err(captured, fp8(x)) < 1e-2


@pytest.mark.parametrize("kernel", ["fa2", "generic"])
def test_tiny_model_with_fp8_kv_agrees_across_backends(tiny_path, kernel, monkeypatch):
    """The head_dim-64 tiny model over fp8 KV pages, decoding in bf16 math (FA2 or XQA's
    generic kernel): flashinfer (with CUDA graphs) agrees with the torch backend as
    tests/gpu/test_gpu_engine.py defines agreement."""
    monkeypatch.setenv("PDSERVE_FP8_DECODE", kernel)
    prompts = gpu_engine._prompts(0)
    ref, _ = gpu_engine._generate(tiny_path, prompts, attention_backend="torch",
                                  kv_cache_dtype="fp8_e4m3")
    got, replays = gpu_engine._generate(tiny_path, prompts, attention_backend="flashinfer",
                                        cuda_graphs=True, kv_cache_dtype="fp8_e4m3")
    gpu_engine.assert_agree(ref, got)
    assert replays > 0


def test_tiny_model_decoding_fp8_kv_in_fp8_math_stays_near_the_reference(tiny_path, monkeypatch):
    """XQA's Hopper fp8 kernel, the default decode over fp8 pages, in the engine with CUDA
    graphs: every request's first decode step (both backends read the same fp8 pages, written
    by the same prefill) picks a token of the torch backend's top two, its log-probability
    within FP8_MATH_TIE. Later steps compound the fp8 rounding of queries and softmax weights on
    this random model (it flipped a 1.9-nat margin at a fifth step), so they are not compared;
    they must stay finite."""
    monkeypatch.setenv("PDSERVE_FP8_DECODE", "gmma")  # the default, whatever the environment
    prompts = gpu_engine._prompts(0)
    ref, _ = gpu_engine._generate(tiny_path, prompts, attention_backend="torch",
                                  kv_cache_dtype="fp8_e4m3")
    got, replays = gpu_engine._generate(tiny_path, prompts, attention_backend="flashinfer",
                                        cuda_graphs=True, kv_cache_dtype="fp8_e4m3")
    assert replays > 0
    for r, g in zip(ref, got, strict=True):
        assert len(g.token_ids) == gpu_engine.GREEDY.max_tokens
        assert all(math.isfinite(lp.logprob) for lp in g.logprobs)
        top = dict(r.logprobs[1].top[:2])  # index 0 is the prefill's token, 1 the first decode
        assert r.token_ids[0] == g.token_ids[0] and g.token_ids[1] in top
        gap = abs(top[g.token_ids[1]] - g.logprobs[1].logprob)
        print(f"first decode step: reference {r.token_ids[1]}, xqa {g.token_ids[1]}, "
              f"log-probability {gap:.3f} apart")
        assert gap < FP8_MATH_TIE


def _fused_kernel_cases(m: int):
    """(compiled call, eager reference) for each fused kernel of engine/fp8_fusion.py, on
    Llama-3-8B-shaped bf16 inputs of m rows: add+RMSNorm+quantize, SiLU-and-mul+quantize."""
    torch.manual_seed(m)
    h, i = 4096, 14336
    norm = RMSNorm(h, 1e-5).to(DEV, DT)
    raw_h = torch.randn(m, h, device=DEV, dtype=DT) * 300
    res = torch.randn(m, h, device=DEV, dtype=DT)
    raw_i = torch.randn(m, 2 * i, device=DEV, dtype=DT) * 300
    xs, ws_h, ws_i = (torch.rand(*s, device=DEV) * 0.01 for s in ((m, 1), (h,), (2 * i,)))
    pend_h, pend_i = fp8_fusion.Pending(raw_h, xs, ws_h), fp8_fusion.Pending(raw_i, xs, ws_i)
    return [(lambda: fp8_fusion.add_rmsnorm_quantize(pend_h, res, norm, None),
             lambda: fp8_fusion.add_rmsnorm_quantize_kernel(raw_h, xs, ws_h, res, norm.weight,
                                                            norm.eps, None), raw_h),
            (lambda: fp8_fusion.silu_mul_quantize(pend_i, None),
             lambda: fp8_fusion.silu_mul_quantize_kernel(raw_i, xs, ws_i, None), raw_i)]


def _assert_close_quantized(got, want) -> None:
    """(xq, scale[, residual]) against the eager reference: the same values up to rounding (an
    fp8 code may flip where a value sits at a rounding boundary)."""
    assert got[0].dtype == FP8 and got[0].shape == want[0].shape
    assert rel_err(got[1], want[1]) < 1e-3
    assert rel_err(got[0].float() * got[1], want[0].float() * want[1]) < 1e-2
    for g, w in zip(got[2:], want[2:], strict=True):
        assert g.dtype == w.dtype and rel_err(g, w) < 1e-2


@pytest.mark.parametrize("m", [1, 32, 128, 512, 2048])  # split, loop and persistent variants
def test_compiled_fused_fp8_kernels_match_eager_and_replay_in_cuda_graphs(m):
    for compiled, eager, source in _fused_kernel_cases(m):
        with torch.inference_mode():
            _assert_close_quantized(compiled(), eager())
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured = compiled()
            source.copy_(torch.randn_like(source) * 300)
            graph.replay()
            torch.cuda.synchronize()
            _assert_close_quantized(captured, eager())


@pytest.mark.parametrize(("m", "prefix"), [(128, "triton_red_"), (2048, "triton_per_")])
def test_prefill_rows_run_persistent_reductions(m, prefix):
    """From PERSISTENT_FROM_M rows each fused kernel holds its rows whole (Inductor names such
    kernels triton_per_*), below it the kernels loop over each row (triton_red_*)."""
    from torch.profiler import ProfilerActivity, profile

    for compiled, _, _ in _fused_kernel_cases(m):
        with torch.inference_mode():
            compiled()  # compiles outside the profile
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                compiled()
                torch.cuda.synchronize()
        names = [e.key for e in prof.key_averages() if e.key.startswith("triton_")]
        assert names and all(n.startswith(prefix) for n in names), names


def test_tiny_model_with_fused_fp8_layers_stays_close_to_bf16_in_cuda_graphs(tiny_path):
    """fp8 weights through the fused layers (compiled, flashinfer, CUDA graphs): next-token
    distributions within the CPU test's bound of the bf16 model's (tests/test_fp8.py; broken
    scales give top-1 agreement near 1/vocab), and greedy decoding replays graphs."""
    kw = dict(gpu_engine.COMMON, attention_backend="flashinfer", cuda_graphs=True)
    ref = LLM(tiny_path, **kw)
    fp8 = LLM(tiny_path, quantize="fp8", **kw)
    kl, top1 = agreement(ref, fp8, gpu_engine._prompts(0))
    print(f"fused fp8 vs bf16: KL {kl:.3f}, top-1 {top1:.2f}")
    assert kl < 1.0 and top1 > 0.5
    out = fp8.generate(gpu_engine._prompts(1), gpu_engine.GREEDY)
    assert all(len(o.token_ids) == gpu_engine.GREEDY.max_tokens for o in out)
    assert gpu_engine._graph_replays(fp8) > 0


# No backend-agreement test with fp8 weights *and* fp8 KV on this model: per-token fp8 rounding
# of activations amplifies the attention kernels' bf16 rounding differences, and this random
# model's next-token distributions are flat. In run 35 (docs/fp8.md) flashinfer picked, at the
# first token, one outside the torch backend's top two, which were 0.25 nats apart. fp8 KV is
# checked above and fp8 weights in the GEMM and CUDA-graph tests; both together run end to end
# in `bench.gpu_serve --config configs/llama3-8b-gpu-fp8.yaml`.

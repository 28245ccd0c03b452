"""engine/gemv.py on the GPU: the compiled one-row reduction against cuBLAS, its capture in a
CUDA graph, and a batch-1 greedy run of the tiny model with it against the same run without."""

from __future__ import annotations

import pytest
import torch
from torch import nn

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from engine import gemv  # noqa: E402
from engine.llm import LLM  # noqa: E402
from tests.gpu import test_gpu_engine as gpu_engine  # noqa: E402
from tests.gpu.test_flashinfer_backend import rel_err  # noqa: E402

tiny_path = gpu_engine.tiny_path  # the head_dim-64 tiny llama (a module-scoped fixture)

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_out, n_in, bias", [(384, 256, False), (192, 1024, True)])
def test_one_row_matches_cublas_and_replays_in_a_cuda_graph(dtype, n_out, n_in, bias):
    """The compiled kernel's output is cuBLAS's within rounding; `linear` runs whichever of the
    two measured faster for the shape, and replays it in a CUDA graph."""
    torch.manual_seed(0)
    layer = nn.Linear(n_in, n_out, bias=bias, device="cuda", dtype=dtype)
    x = torch.randn(1, n_in, device="cuda", dtype=dtype)
    with torch.inference_mode(), gemv.for_cuda_graphs():
        assert gemv.uses_gemv(layer, x)
        got = gemv.linear(layer, x)
        assert ((n_out, n_in), bias, dtype, x.device) in gemv._timings  # timed once, kept
        assert any(line.startswith(f"{n_out}x{n_in}") for line in gemv.report())
        compiled = gemv._compiled()(x, layer.weight, layer.bias)
        assert rel_err(compiled, layer(x)) < 4e-3  # whichever of the two the timing kept
        assert got.shape == (1, n_out) and got.dtype == dtype
        assert rel_err(got, layer(x)) < 4e-3  # the summation order differs, in fp32
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = gemv.linear(layer, x)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, gemv.linear(layer, x))  # the same kernel, new input


def test_batch_one_decoding_agrees_with_cublas(tiny_path, monkeypatch):
    """One request, so every decode step is a one-row graph replay through the reduction (kept
    for every shape here, whatever the timing would pick, so that it is what runs)."""
    prompts = gpu_engine._prompts(3, n=1)
    kw = dict(gpu_engine.COMMON, attention_backend="flashinfer", cuda_graphs=True)
    monkeypatch.setenv("PDSERVE_GEMV", "0")
    ref = LLM(tiny_path, **kw).generate(prompts, gpu_engine.GREEDY)
    monkeypatch.delenv("PDSERVE_GEMV")
    calls = []
    monkeypatch.setattr(gemv, "_compiled_is_faster", lambda layer, x: calls.append(x) or True)
    llm = LLM(tiny_path, **kw)
    got = llm.generate(prompts, gpu_engine.GREEDY)
    gpu_engine.assert_agree(ref, got)
    assert gpu_engine._graph_replays(llm) > 0 and "failed" not in gemv._state
    # bucket 1's warm-up and capture each ran every layer's 4 projections and lm_head through it
    assert len(calls) >= 2 * (4 * len(llm.engine.runner.model.layers) + 1)

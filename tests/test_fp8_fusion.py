"""The fused fp8 layer (engine/fp8_fusion.py): its kernels are the unfused ops composed, and a
model run through it gives bit for bit the logits of the one-projection-at-a-time path (fp32 on
CPU, where both apply the same float32 ops in the same order), mixed fp8 / full-precision
layers included."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file, save_file

from bench.gpu_fp8 import prompt_logits
from engine import fp8_fusion, fp8_linear
from engine.fp8_fusion import Pending, add_rmsnorm_quantize_kernel, silu_mul_quantize_kernel
from engine.fp8_linear import FP8, Fp8Linear, dequantize_output, quantize_rows, quantize_static
from engine.llm import LLM
from engine.model import RMSNorm
from engine.tiny_fp8 import make_fp8_checkpoint, quantization_config


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == FP8 else t


def assert_same(got: tuple, want: tuple) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert torch.equal(bits(g), bits(w))


# -- the kernels ------------------------------------------------------------------------------
@pytest.mark.parametrize("static", [False, True])
def test_add_rmsnorm_quantize_is_add_then_norm_then_quantize(static):
    torch.manual_seed(0)
    t, h, eps = 5, 64, 1e-5
    raw, residual = torch.randn(t, h) * 300, torch.randn(t, h)
    x_scale, w_scale = torch.rand(t, 1) * 0.01, torch.rand(h) * 0.01
    norm = RMSNorm(h, eps)
    norm.weight.data = torch.rand(h) + 0.5
    input_scale = torch.tensor(0.004) if static else None

    def quantize(x):
        return quantize_rows(x) if input_scale is None else quantize_static(x, input_scale)

    with torch.no_grad():
        summed = residual + dequantize_output(raw, x_scale, w_scale, None, torch.float32)
        want = (*quantize(norm(summed)), summed)
        got = add_rmsnorm_quantize_kernel(raw, x_scale, w_scale, residual, norm.weight, eps,
                                          input_scale)
        assert_same(got, want)
        # layer 0: the embeddings are the residual stream, no add
        assert_same(add_rmsnorm_quantize_kernel(residual, None, None, None, norm.weight, eps,
                                                input_scale), (*quantize(norm(residual)), residual))
        # the wrapper unpacks a Pending into the same call
        assert_same(fp8_fusion.add_rmsnorm_quantize(Pending(raw, x_scale, w_scale), residual,
                                                    norm, input_scale), want)


def test_silu_mul_quantize_is_dequantize_then_silu_and_mul_then_quantize():
    torch.manual_seed(0)
    t, i = 3, 96
    raw, x_scale, w_scale = torch.randn(t, 2 * i) * 500, torch.rand(t, 1) * 0.01, torch.rand(2 * i)
    gate, up = dequantize_output(raw, x_scale, w_scale, None, torch.float32).chunk(2, dim=-1)
    want = quantize_rows(torch.nn.functional.silu(gate) * up)
    assert_same(silu_mul_quantize_kernel(raw, x_scale, w_scale, None), want)
    assert_same(fp8_fusion.silu_mul_quantize(Pending(raw, x_scale, w_scale), None), want)


@pytest.mark.parametrize("m", [7, fp8_linear.ROWWISE_MIN_M])
def test_a_projection_leaves_its_scales_pending_below_rowwise_min_m(m):
    torch.manual_seed(0)
    fp8 = Fp8Linear.from_linear(torch.nn.Linear(256, 384, bias=False).to(torch.bfloat16))
    x = torch.randn(m, 256, dtype=torch.bfloat16)
    out = fp8_fusion.project(fp8, *quantize_rows(x))
    if m < fp8_linear.ROWWISE_MIN_M:  # the unscaled GEMM; the scales wait for the next kernel
        assert out.x_scale is not None and out.raw.abs().max() > 1000
    else:  # the row-wise GEMM applied them
        assert out.x_scale is None and out.w_scale is None
    assert torch.equal(out.value(torch.bfloat16), fp8(x))


def test_a_pending_output_is_its_scaled_value():
    raw = torch.tensor([[2.0, -4.0], [1.0, 8.0]])
    got = Pending(raw, torch.tensor([[0.5], [2.0]]), torch.tensor([1.0, 0.25])).value(torch.float32)
    assert torch.equal(got, torch.tensor([[1.0, -0.5], [2.0, 4.0]]))


# -- the model --------------------------------------------------------------------------------
def fused_and_unfused(monkeypatch, path: str, **kw) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(logits fused, logits unfused, how many layer passes ran fused) for one prompt."""
    calls = []
    kernel = fp8_fusion._silu_mul_quantize
    monkeypatch.setattr(fp8_fusion, "_silu_mul_quantize",
                        lambda *a: (calls.append(1), kernel(*a))[1])
    rng = random.Random(0)
    prompt = [rng.randrange(6, 2000) for _ in range(40)]
    out = []
    for switch in ("1", "0"):
        monkeypatch.setenv("PDSERVE_FP8_FUSION", switch)
        out.append(prompt_logits(LLM(path, num_pages=64, **kw), prompt))
    return out[0], out[1], len(calls)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fused_layers_give_the_unfused_logits_bit_for_bit(monkeypatch, tiny_models, family):
    fused, unfused, passes = fused_and_unfused(monkeypatch, tiny_models[family], quantize="fp8")
    assert passes == 4  # every layer of the 4-layer model, once, fused only when switched on
    assert torch.equal(fused, unfused)


def test_static_input_scales_run_fused_with_the_same_logits(monkeypatch, tiny_llama, tmp_path):
    path = str(make_fp8_checkpoint(tiny_llama, tmp_path / "static", "tensor", static_input=True))
    fused, unfused, passes = fused_and_unfused(monkeypatch, path)
    assert passes == 4 and torch.equal(fused, unfused)


def test_full_precision_layers_between_fp8_ones_take_their_input_scaled(monkeypatch, tiny_llama,
                                                                        tmp_path):
    """Layer 1 left unquantized by the checkpoint's ignore list: layer 0 hands it a Pending,
    which it scales before its own (unfused) norm; layer 2 takes a plain tensor again."""
    path = make_fp8_checkpoint(tiny_llama, tmp_path / "mixed", "channel")
    original = load_file(f"{tiny_llama}/model.safetensors")
    tensors = {k: v for k, v in load_file(f"{path}/model.safetensors").items()
               if not k.startswith("model.layers.1.") or k.endswith("norm.weight")}
    tensors.update({k: v for k, v in original.items() if k.startswith("model.layers.1.")})
    save_file(tensors, f"{path}/model.safetensors")
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {**quantization_config("channel", False),
                                  "ignore": ["lm_head", r"re:model\.layers\.1\..*"]}
    (path / "config.json").write_text(json.dumps(cfg))
    fused, unfused, passes = fused_and_unfused(monkeypatch, str(path))
    assert passes == 3  # layers 0, 2 and 3
    assert torch.equal(fused, unfused)


def test_start_up_warm_up_reaches_the_row_wise_kernels(monkeypatch, tiny_llama):
    """The start-up forward of ROWWISE_MIN_M tokens (GPU engines with fused fp8 layers run it,
    so that no request waits for the row-wise variants' compile) takes the row-wise GEMM in
    every projection and writes K/V only into the first pages, which no request holds yet."""
    llm = LLM(tiny_llama, quantize="fp8", dtype="bfloat16", num_pages=64)  # row-wise: bf16 out
    runner = llm.engine.runner
    rowwise = []
    gemm = fp8_linear.Fp8Linear.gemm_rowwise
    monkeypatch.setattr(fp8_linear.Fp8Linear, "gemm_rowwise",
                        lambda self, *a: (rowwise.append(a[0].shape[0]), gemm(self, *a))[1])
    layers = runner.pool.layers[0]
    before = layers.clone()
    assert runner.warm_up_rowwise_fp8()
    pages = fp8_linear.ROWWISE_MIN_M // runner.pool.page_size
    n = len(runner.model.layers)
    # qkv goes through Fp8Linear.gemm, the other three through project(): all row-wise
    assert rowwise == [fp8_linear.ROWWISE_MIN_M] * (4 * n)
    assert not torch.equal(bits(layers[:pages]), bits(before[:pages]))
    assert torch.equal(bits(layers[pages:]), bits(before[pages:]))
    assert llm.engine.scheduler.kv.allocator.num_used == 0  # no page was reserved for it


def test_a_pool_or_context_smaller_than_the_warm_up_skips_it(tiny_llama):
    assert not LLM(tiny_llama, quantize="fp8", num_pages=8).engine.runner.warm_up_rowwise_fp8()
    llm = LLM(tiny_llama, quantize="fp8", num_pages=64, max_model_len=128)
    assert not llm.engine.runner.warm_up_rowwise_fp8()

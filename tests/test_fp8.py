"""fp8 weights on CPU (torch._scaled_mm's reference kernel): Fp8Linear against its own
quantized operands and against the bf16 layer, quantize-at-load and compressed-tensors
checkpoints loading the same weights, shard scales fused per channel, and the errors a wrong
checkpoint or setting gives."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from bench.gpu_fp8 import prompt_logits
from engine import fp8_linear
from engine.config import ModelConfig
from engine.fp8_checkpoint import checkpoint_scheme
from engine.fp8_linear import FP8, FP8_MAX, Fp8Linear, quantize_rows, quantize_weight
from engine.llm import LLM
from engine.model_arch import ModelArch
from engine.sampling_params import SamplingParams
from engine.tiny_fp8 import make_fp8_checkpoint, quantization_config
from kvtransfer import model_fingerprint

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PROJ = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
# Relative (Frobenius) error of an fp8 GEMM against the bf16 one on Gaussian data: e4m3 keeps
# 3 mantissa bits (rounding error up to 1/16 per element, ~3.6% rms per operand); measured
# 3.4-3.7% here, bounded at 6%.
FP8_GEMM_REL_ERR = 0.06


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def agreement(ref: LLM, other: LLM, prompts: list[list[int]]) -> tuple[float, float]:
    """(mean KL(ref || other) of next-token distributions, top-1 agreement) over all positions."""
    kls, same = [], []
    for p in prompts:
        a, b = prompt_logits(ref, p).log_softmax(-1), prompt_logits(other, p).log_softmax(-1)
        kls.append((a.exp() * (a - b)).sum(-1))
        same.append((a.argmax(-1) == b.argmax(-1)).float())
    return torch.cat(kls).mean().item(), torch.cat(same).mean().item()


def prompts(n: int = 3, length: int = 100) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(6, 2000) for _ in range(length)] for _ in range(n)]


@pytest.fixture(scope="module")
def ckpts(tiny_models, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("fp8")
    llama = tiny_models["llama"]
    return {
        "channel": str(make_fp8_checkpoint(llama, root / "channel", "channel")),
        "tensor": str(make_fp8_checkpoint(llama, root / "tensor", "tensor")),
        "static": str(make_fp8_checkpoint(llama, root / "static", "tensor", static_input=True)),
        "qwen2": str(make_fp8_checkpoint(tiny_models["qwen2"], root / "qwen2", "channel")),
    }


# -- the layer --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 7, fp8_linear.ROWWISE_MIN_M])
@pytest.mark.parametrize("bias", [False, True])
def test_fp8_linear_is_the_gemm_of_its_quantized_operands(dtype, m, bias):
    torch.manual_seed(0)
    lin = nn.Linear(256, 384, bias=bias).to(dtype)
    fp8 = Fp8Linear.from_linear(lin)
    x = torch.randn(m, 256, dtype=dtype)
    xq, sx = quantize_rows(x)
    exact = (xq.float() * sx) @ fp8.dequantized_weight().T  # fp32 math on the fp8 operands
    if bias:
        exact += lin.bias.float()
    y = fp8(x)
    assert y.dtype == dtype and y.shape == (m, 384)
    assert rel_err(y, exact) < (1e-6 if dtype == torch.float32 else 8e-3)  # output rounding
    assert rel_err(y, lin(x)) < FP8_GEMM_REL_ERR


def test_both_gemm_paths_give_the_same_result(monkeypatch):
    torch.manual_seed(1)
    fp8 = Fp8Linear.from_linear(nn.Linear(256, 384, bias=True).to(torch.bfloat16))
    x = torch.randn(3, 5, 256, dtype=torch.bfloat16)  # leading dims are flattened and restored
    monkeypatch.setattr(fp8_linear, "ROWWISE_MIN_M", 10**9)
    per_tensor = fp8(x)
    monkeypatch.setattr(fp8_linear, "ROWWISE_MIN_M", 1)
    rowwise = fp8(x)
    assert per_tensor.shape == rowwise.shape == (3, 5, 384)
    assert rel_err(rowwise, per_tensor) < 8e-3


def test_weight_quantization_is_per_channel_and_round_trips_within_e4m3_precision():
    w = torch.randn(32, 64) * torch.logspace(-3, 1, 32)[:, None]  # channels 4 decades apart
    wq, scale = quantize_weight(w)
    assert wq.dtype == FP8 and scale.shape == (32,)
    assert torch.equal(scale, w.abs().amax(1) / FP8_MAX)
    assert torch.equal(wq.float().abs().amax(1), torch.full((32,), FP8_MAX))  # max -> 448
    err = (wq.float() * scale[:, None] - w).abs()
    assert (err <= w.abs() / 16 + scale[:, None] * 2**-9).all()  # 3 mantissa bits (+subnormals)


def test_activation_scales_are_per_token_and_zero_rows_stay_finite():
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]])
    xq, s = quantize_rows(x)
    assert torch.equal(s[0], torch.tensor([2.0 / FP8_MAX]))
    assert torch.equal(xq[0].float(), torch.tensor([224.0, -448.0, 112.0]))
    assert torch.equal(xq[1].float(), torch.zeros(3)) and torch.isfinite(s).all()


def test_fp8_linear_refuses_shapes_the_fp8_gemm_cannot_run():
    with pytest.raises(ValueError, match="multiples of 16, got 100 -> 384"):
        Fp8Linear(100, 384, bias=False, out_dtype=torch.bfloat16)


# -- loading ----------------------------------------------------------------------------------
def fp8_modules(llm: LLM) -> dict[str, Fp8Linear]:
    return {n: m for n, m in llm.engine.model.named_modules() if isinstance(m, Fp8Linear)}


def test_quantize_at_load_swaps_the_decoder_projections_only(tiny_llama):
    llm = LLM(tiny_llama, num_pages=64, quantize="fp8")
    assert sorted(fp8_modules(llm)) == sorted(f"layers.{i}.{p}" for i in range(4) for p in PROJ)
    model = llm.engine.model
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.float32
    assert model.embed_tokens.weight.dtype == torch.float32


def test_a_channel_checkpoint_loads_the_weights_quantize_at_load_makes(tiny_llama, ckpts):
    assert checkpoint_scheme(ckpts["channel"]).prequantized
    at_load = LLM(tiny_llama, num_pages=64, quantize="fp8")
    loaded = LLM(ckpts["channel"], num_pages=64)  # quantize unset: config.json turns fp8 on
    a, b = fp8_modules(at_load), fp8_modules(loaded)
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name].weight.view(torch.uint8), b[name].weight.view(torch.uint8))
        assert torch.equal(a[name].weight_scale, b[name].weight_scale)
    p = prompts(2, 40)
    assert [o.token_ids for o in at_load.generate(p, GREEDY)] == \
        [o.token_ids for o in loaded.generate(p, GREEDY)]


def test_per_tensor_shard_scales_become_per_channel_rows_of_the_fused_layer(ckpts):
    llm = LLM(ckpts["tensor"], num_pages=64)
    arch = llm.engine.arch
    file = load_file(f"{ckpts['tensor']}/model.safetensors")
    qkv = fp8_modules(llm)["layers.1.qkv_proj"]
    rows = {"q": slice(0, arch.q_size), "k": slice(arch.q_size, arch.q_size + arch.kv_size),
            "v": slice(arch.q_size + arch.kv_size, None)}
    for shard, r in rows.items():
        base = f"model.layers.1.self_attn.{shard}_proj."
        scale = file[base + "weight_scale"]
        assert scale.shape == (1,)
        assert torch.equal(qkv.weight_scale[r], scale.expand(qkv.weight_scale[r].shape))
        assert torch.equal(qkv.weight[r].view(torch.uint8), file[base + "weight"].view(torch.uint8))
    gate_up = fp8_modules(llm)["layers.1.gate_up_proj"]
    up_scale = file["model.layers.1.mlp.up_proj.weight_scale"]
    assert torch.equal(gate_up.weight_scale[arch.intermediate_size:],
                       up_scale.expand(arch.intermediate_size))


def test_static_input_scales_of_fused_shards_merge_into_their_maximum(ckpts, tmp_path):
    import shutil

    path = tmp_path / "static"
    shutil.copytree(ckpts["static"], path)
    tensors = load_file(str(path / "model.safetensors"))
    tensors["model.layers.0.self_attn.k_proj.input_scale"] = torch.tensor([0.07])
    save_file(tensors, str(path / "model.safetensors"))
    llm = LLM(str(path), num_pages=64)
    mods = fp8_modules(llm)
    assert mods["layers.0.qkv_proj"].input_scale.item() == pytest.approx(0.07)
    assert mods["layers.0.o_proj"].input_scale.item() == pytest.approx(0.05)
    assert mods["layers.1.qkv_proj"].input_scale.item() == pytest.approx(0.05)
    assert len(llm.generate(prompts(1, 20), GREEDY)[0].token_ids) == GREEDY.max_tokens


def test_qwen2_fp8_checkpoint_keeps_its_qkv_bias_and_tied_lm_head(tiny_models, ckpts):
    llm = LLM(ckpts["qwen2"], num_pages=64)
    file = load_file(f"{ckpts['qwen2']}/model.safetensors")
    qkv = fp8_modules(llm)["layers.0.qkv_proj"]
    assert torch.equal(qkv.bias[:256], file["model.layers.0.self_attn.q_proj.bias"])
    model = llm.engine.model
    assert model.lm_head.weight is model.embed_tokens.weight  # tied, bf16/fp32, not quantized
    at_load = LLM(tiny_models["qwen2"], num_pages=64, quantize="fp8")
    p = prompts(1, 30)
    assert llm.generate(p, GREEDY)[0].token_ids == at_load.generate(p, GREEDY)[0].token_ids


def test_fp8_weights_stay_close_to_the_full_precision_model(tiny_llama):
    # The tiny model's random weights (sharp attention, wide lm_head) amplify any weight error:
    # its fp32 weights merely rounded through fp8 move the logits by 16% already. Broken
    # scales or shards give top-1 agreement near 1/vocab; measured here: KL 0.50, top-1 0.64.
    ref = LLM(tiny_llama, num_pages=64)
    kl, top1 = agreement(ref, LLM(tiny_llama, num_pages=64, quantize="fp8"), prompts())
    assert kl < 1.0 and top1 > 0.5


def test_dummy_weights_quantize_at_load(tiny_llama):
    llm = LLM(tiny_llama, num_pages=64, load_format="dummy", quantize="fp8")
    assert len(fp8_modules(llm)) == 4 * len(PROJ)
    assert len(llm.generate([[7, 8, 9]], GREEDY)[0].token_ids) == GREEDY.max_tokens


def test_quantized_weights_have_their_own_fingerprint(tiny_llama):
    plain = model_fingerprint(tiny_llama, "bfloat16", "safetensors", 0)
    assert plain == model_fingerprint(tiny_llama, "bfloat16", "safetensors", 0, None)
    assert plain != model_fingerprint(tiny_llama, "bfloat16", "safetensors", 0, "fp8")


# -- errors -----------------------------------------------------------------------------------
def with_quantization_config(src: str, dest, qc: dict) -> str:
    import shutil

    shutil.copytree(src, dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg["quantization_config"] = qc
    (dest / "config.json").write_text(json.dumps(cfg))
    return str(dest)


@pytest.mark.parametrize("qc, message", [
    ({"quant_method": "gptq", "bits": 4}, "has quant_method 'gptq'"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "has block-wise fp8 scales"),
    ({**quantization_config("channel", False), "format": "pack-quantized"},
     "has format 'pack-quantized'"),
    ({**quantization_config("channel", False), "config_groups": {"g": {
        "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
        "input_activations": None}}}, r"leaves activations unquantized \(weight-only fp8\)"),
    ({**quantization_config("channel", False), "config_groups": {"g": {
        "weights": {"num_bits": 4, "type": "int", "strategy": "group"},
        "input_activations": None}}}, "quantizes weights as"),
])
@pytest.mark.parametrize("quantize", [None, "fp8"])
def test_a_checkpoint_quantized_otherwise_is_refused_with_or_without_quantize(
        tiny_llama, tmp_path, qc, message, quantize):
    path = with_quantization_config(tiny_llama, tmp_path / "m", qc)
    with pytest.raises(ValueError, match=f"quantization_config {message}.*pdserve loads fp8"):
        LLM(path, num_pages=64, quantize=quantize)


def test_ignoring_part_of_a_fused_layer_is_refused(tiny_llama, tmp_path):
    qc = {**quantization_config("channel", False),
          "ignore": ["lm_head", "model.layers.2.self_attn.k_proj"]}
    path = with_quantization_config(tiny_llama, tmp_path / "m", qc)
    with pytest.raises(ValueError, match="covers only some of .*k_proj.* in layer 2"):
        LLM(path, num_pages=64)


def test_fp8_weights_of_a_layer_the_config_ignores_are_refused(ckpts, tmp_path):
    qc = {**quantization_config("channel", False), "ignore": ["lm_head", "re:.*down_proj"]}
    path = with_quantization_config(ckpts["channel"], tmp_path / "m", qc)
    with pytest.raises(ValueError, match=r"down_proj.weight.*float8_e4m3fn, expected "
                                         r"torch.float32 \(not quantized here\)"):
        LLM(path, num_pages=64)


def test_an_unknown_quantize_value_names_the_valid_ones(tiny_llama):
    with pytest.raises(ValueError, match="quantize must be one of fp8; got 'int8'"):
        ModelConfig(tiny_llama, quantize="int8")
    assert ModelArch.from_pretrained(tiny_llama).num_layers == 4


def test_the_tiny_model_maker_writes_an_fp8_checkpoint(tmp_path):
    from engine.cli import main as cli_main

    assert cli_main(["make-tiny-model", str(tmp_path / "m"), "--fp8", "tensor"]) == 0
    scheme = checkpoint_scheme(tmp_path / "m")
    assert scheme.prequantized and not scheme.static_input_scale and scheme.ignore == ("lm_head",)
    file = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert file["model.layers.0.mlp.down_proj.weight"].dtype == FP8
    assert file["model.layers.0.mlp.down_proj.weight_scale"].shape == (1,)
    assert file["lm_head.weight"].dtype == torch.float32
    assert (tmp_path / "m" / "tokenizer.json").is_file()


def test_a_checkpoint_that_quantized_lm_head_runs_it_in_fp8(ckpts, tmp_path):
    qc = {**quantization_config("channel", False), "ignore": []}
    path = with_quantization_config(ckpts["channel"], tmp_path / "m", qc)
    tensors = load_file(f"{path}/model.safetensors")
    wq, scale = quantize_weight(tensors["lm_head.weight"])
    tensors["lm_head.weight"], tensors["lm_head.weight_scale"] = wq, scale[:, None]
    save_file(tensors, f"{path}/model.safetensors")
    llm = LLM(path, num_pages=64)
    head = llm.engine.model.lm_head
    assert isinstance(head, Fp8Linear) and torch.equal(head.weight_scale, scale)
    assert llm.engine.model.embed_tokens.weight.dtype == torch.float32
    assert len(llm.generate(prompts(1, 20), GREEDY)[0].token_ids) == GREEDY.max_tokens

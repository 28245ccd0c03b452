"""The model carries (hidden, residual) between layers: layer i returns its MLP output and the
residual stream without adding them, and the next norm adds them (one fused kernel on the GPU).

On the CPU this must be the textbook pre-norm layer, bit for bit: x' = x + attn(norm(x)),
x'' = x' + mlp(norm(x')), out = norm(x_L). The reference below is that formula written out
with the model's own modules, so any change of the add order shows up as a non-equal tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.attention.metadata import build_metadata
from engine.attention.torch_backend import TorchBackend
from engine.kv_pool import KVPool
from engine.model import CausalLM, DecoderLayer
from engine.model_arch import ModelArch

HQ, HKV, D, PS = 4, 2, 8, 4
ARCH = ModelArch("LlamaForCausalLM", vocab_size=50, hidden_size=32, intermediate_size=48,
                 num_layers=3, num_heads=HQ, num_kv_heads=HKV, head_dim=D, rms_norm_eps=1e-5,
                 rope_theta=10000.0)
CPU = torch.device("cpu")


def _model() -> CausalLM:
    torch.manual_seed(0)
    model = CausalLM(ARCH, max_positions=64)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


def _step(num_layers: int = ARCH.num_layers):
    """A prefill of 5 + 3 tokens of two requests: pool, plan and inputs."""
    pool = KVPool(ARCH, num_pages=8, page_size=PS, dtype=torch.float32, device="cpu")
    backend = TorchBackend(num_q_heads=HQ, num_kv_heads=HKV, head_dim=D, dtype=torch.float32,
                           device="cpu", page_size=PS)
    meta = build_metadata([[0, 1], [2]], [0, 0], [5, 3], PS, CPU)
    ids = torch.tensor([3, 14, 15, 9, 26, 5, 35, 8])
    return pool, backend.plan(meta), ids, meta.positions


def _reference_layer(layer: DecoderLayer, i: int, x, positions, rope, plan, cache):
    """The pre-norm layer with one tensor between layers (the formula before the split)."""
    t = x.shape[0]
    qkv = layer.qkv_proj(layer.input_norm(x))
    q, k, v = qkv.split([ARCH.q_size, ARCH.kv_size, ARCH.kv_size], dim=-1)
    q, k = rope(positions, q.view(t, HQ, D), k.view(t, HKV, D))
    x = x + layer.o_proj(plan.forward(i, q, k, v.view(t, HKV, D), cache).reshape(t, -1))
    gate, up = layer.gate_up_proj(layer.post_attn_norm(x)).chunk(2, dim=-1)
    return x + layer.down_proj(F.silu(gate) * up)


@torch.inference_mode()
def test_each_layer_output_is_residual_plus_mlp_out_bit_for_bit():
    model = _model()
    pool, plan, ids, positions = _step()
    ref_pool, ref_plan, _, _ = _step()
    hidden, residual = model.embed_tokens(ids), None
    x = model.embed_tokens(ids)
    for i, layer in enumerate(model.layers):
        hidden, residual = layer(i, hidden, residual, positions, model.rope, plan,
                                 pool.layers[i])
        x = _reference_layer(layer, i, x, positions, model.rope, ref_plan, ref_pool.layers[i])
        assert hidden.shape == residual.shape == (8, ARCH.hidden_size)
        assert torch.equal(residual + hidden, x)
        assert torch.equal(pool.layers[i], ref_pool.layers[i])  # the same K/V written


@torch.inference_mode()
def test_layer_zero_takes_the_embeddings_as_the_residual_stream():
    model = _model()
    pool, plan, ids, positions = _step()
    emb = model.embed_tokens(ids)
    _, residual = model.layers[0](0, emb, None, positions, model.rope, plan, pool.layers[0])
    # residual = embeddings + attention output: not the embeddings, and no double count
    ref_pool, ref_plan, _, _ = _step()
    layer = model.layers[0]
    t = emb.shape[0]
    qkv = layer.qkv_proj(layer.input_norm(emb))
    q, k, v = qkv.split([ARCH.q_size, ARCH.kv_size, ARCH.kv_size], dim=-1)
    q, k = model.rope(positions, q.view(t, HQ, D), k.view(t, HKV, D))
    attn = ref_plan.forward(0, q, k, v.view(t, HKV, D), ref_pool.layers[0]).reshape(t, -1)
    assert torch.equal(residual, emb + layer.o_proj(attn))


@torch.inference_mode()
def test_model_output_is_the_final_norm_of_the_last_layer_output():
    model = _model()
    pool, plan, ids, positions = _step()
    ref_pool, ref_plan, _, _ = _step()
    x = model.embed_tokens(ids)
    for i, layer in enumerate(model.layers):
        x = _reference_layer(layer, i, x, positions, model.rope, ref_plan, ref_pool.layers[i])
    seen = []
    out = model(ids, positions, pool.layers, plan, on_layer=seen.append)
    assert torch.equal(out, model.norm(x))
    assert seen == [0, 1, 2]


@torch.inference_mode()
def test_on_layer_sees_that_layers_kv_written_and_the_next_ones_not_yet():
    model = _model()
    pool, plan, ids, positions = _step()
    written = []

    def on_layer(i: int) -> None:
        # pages 0, 1, 2 hold the step's 8 tokens; untouched layers are still all zeros
        written.append([bool(pool.layers[j][:3].abs().sum() > 0)
                        for j in range(ARCH.num_layers)])

    model(ids, positions, pool.layers, plan, on_layer=on_layer)
    assert written == [[True, False, False], [True, True, False], [True, True, True]]

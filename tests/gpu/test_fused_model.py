"""The model's fused GPU path (FlashInfer RMSNorm, fused add+RMSNorm over the (hidden, residual)
pair, in-place RoPE, SiLU-and-mul) against its plain-PyTorch path, both in bf16 on the GPU, and
both against the same model in float32: the fused path must be as close to float32 as the plain
bf16 path is (a lost or doubled residual add is off by O(1), not by bf16 rounding).

Attention is the torch backend in all three, so only the kernels around it differ; two steps
(a prefill, then a decode over the KV it wrote) check the K/V write too.
"""

from __future__ import annotations

import copy

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("flashinfer")

import engine.model as model_module  # noqa: E402
from engine.attention.metadata import build_metadata  # noqa: E402
from engine.attention.torch_backend import TorchBackend  # noqa: E402
from engine.kv_pool import KVPool  # noqa: E402
from engine.model import CausalLM  # noqa: E402
from engine.model_arch import ModelArch  # noqa: E402

pytestmark = pytest.mark.gpu

DEV = torch.device("cuda")
PS = 16
ARCH = ModelArch("LlamaForCausalLM", vocab_size=512, hidden_size=256, intermediate_size=512,
                 num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64, rms_norm_eps=1e-5,
                 rope_theta=10000.0)


def _logits(model: CausalLM, dtype: torch.dtype) -> list[torch.Tensor]:
    """Logits [T, vocab] of a prefill (20 + 13 tokens) and of the decode step after it."""
    pool = KVPool(ARCH, num_pages=8, page_size=PS, dtype=dtype, device=DEV)
    backend = TorchBackend(num_q_heads=4, num_kv_heads=2, head_dim=64, dtype=dtype, device=DEV,
                           page_size=PS)
    gen = torch.Generator().manual_seed(0)
    tables = [[3, 1], [6]]
    out = []
    for done, new in (([0, 0], [20, 13]), ([20, 13], [1, 1])):
        meta = build_metadata(tables, done, new, PS, DEV)
        ids = torch.randint(0, ARCH.vocab_size, (meta.num_tokens,), generator=gen).to(DEV)
        with torch.inference_mode():
            hidden = model(ids, meta.positions, pool.layers, backend.plan(meta))
            out.append(model.logits(hidden))
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_fused_kernels_are_as_close_to_float32_as_the_plain_bf16_path(monkeypatch):
    torch.manual_seed(0)
    model = CausalLM(ARCH, max_positions=256)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)  # not all ones, so a norm applied to the wrong tensor shows
    model = model.to(DEV, torch.bfloat16)
    ref = _logits(copy.deepcopy(model).float(), torch.float32)  # the bf16 weights, exactly
    assert model_module.fused_kernels(torch.empty(1, device=DEV, dtype=torch.bfloat16))
    fused = _logits(model, torch.bfloat16)
    monkeypatch.setattr(model_module, "fused_kernels", lambda x: None)
    plain = _logits(model, torch.bfloat16)
    for f, p, r in zip(fused, plain, ref, strict=True):
        err_fused, err_plain = _rel(f, r), _rel(p, r)
        assert err_plain < 3e-2  # bf16 rounding (6e-3 measured for this model on the CPU)
        assert err_fused <= 2 * err_plain + 1e-3, (err_fused, err_plain)


def test_the_fused_last_layer_cut_to_the_sampling_rows_gives_their_full_forward_rows():
    """FlashInfer's add+RMSNorm kernels write the residual in place: the cut layer must work
    on copies of its rows, leave K/V as the full forward writes them, and give those rows'
    hidden states (tests/test_last_layer_rows.py checks the plain and fp8 paths on the CPU)."""
    torch.manual_seed(0)
    model = CausalLM(ARCH, max_positions=256).to(DEV, torch.bfloat16)
    assert model_module.fused_kernels(torch.empty(1, device=DEV, dtype=torch.bfloat16))
    backend = TorchBackend(num_q_heads=4, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16,
                           device=DEV, page_size=PS)
    meta = build_metadata([[3, 1], [6]], [0, 0], [20, 13], PS, DEV)
    ids = torch.randint(0, ARCH.vocab_size, (meta.num_tokens,), device=DEV)
    rows = torch.tensor([19, 32], device=DEV)  # each prompt's last token
    pools = [KVPool(ARCH, num_pages=8, page_size=PS, dtype=torch.bfloat16, device=DEV)
             for _ in range(2)]
    with torch.inference_mode():
        full = model(ids, meta.positions, pools[0].layers, backend.plan(meta))
        cut = model(ids, meta.positions, pools[1].layers, backend.plan(meta), rows=rows)
    assert cut.shape == (2, ARCH.hidden_size)
    assert _rel(cut.float(), full[rows].float()) < 1e-2  # bf16 GEMMs of 2 rows against 33
    for a, b in zip(pools[0].layers, pools[1].layers, strict=True):
        assert torch.equal(a, b)

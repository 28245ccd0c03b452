"""engine/gemv.py: which projections take the compiled batch-1 reduction (the kernel itself is
checked against cuBLAS on the GPU, tests/gpu/test_gemv.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine import gemv
from engine.fp8_linear import Fp8Linear


def _meta(shape, dtype=torch.bfloat16) -> torch.Tensor:
    """A tensor that reports CUDA without a GPU: the rule reads only shape, dtype, device."""
    return torch.empty(shape, dtype=dtype, device="meta")


class _OnCuda:
    """x as the rule sees it on a GPU: every attribute of the meta tensor, is_cuda True."""

    def __init__(self, x: torch.Tensor) -> None:
        self._x = x

    def __getattr__(self, name):
        return True if name == "is_cuda" else getattr(self._x, name)


@pytest.mark.parametrize("rows, dtype, expected", [
    (1, torch.bfloat16, True), (1, torch.float16, True),
    (2, torch.bfloat16, False),  # two rows and up: cuBLAS
    (1, torch.float32, False),
])
def test_one_half_precision_row_into_a_plain_linear_takes_it(rows, dtype, expected):
    layer = nn.Linear(64, 32, bias=False, dtype=dtype, device="meta")
    x = _OnCuda(_meta((rows, 64), dtype))
    assert not gemv.uses_gemv(layer, x)  # eager steps keep cuBLAS
    with gemv.for_cuda_graphs():
        assert gemv.uses_gemv(layer, x) is expected
    assert not gemv.uses_gemv(layer, x)


def test_cpu_fp8_layers_and_the_switch_keep_the_layer(monkeypatch):
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    layer = nn.Linear(64, 32, bias=True, dtype=torch.bfloat16)
    with gemv.for_cuda_graphs():
        assert not gemv.uses_gemv(layer, x)  # CPU
        assert torch.equal(gemv.linear(layer, x), layer(x))
        fp8 = Fp8Linear(64, 32, bias=False, out_dtype=torch.bfloat16, device="meta")
        assert not gemv.uses_gemv(fp8, _OnCuda(_meta((1, 64))))  # fp8 weights keep their GEMM
        monkeypatch.setenv("PDSERVE_GEMV", "0")
        assert not gemv.uses_gemv(layer.to("meta"), _OnCuda(_meta((1, 64))))


def test_each_shape_keeps_the_kernel_that_timed_faster(monkeypatch):
    """The timing runs once per (shape, bias, dtype, device) on the GPU; here it is given."""
    dev = torch.device("meta")
    monkeypatch.setattr(gemv, "_timings", {
        ((48, 64), False, torch.bfloat16, dev): (10.0, 12.5),
        ((64, 64), True, torch.float16, dev): (9.0, 8.0)})
    x16 = torch.empty(1, 64, dtype=torch.float16, device=dev)
    faster = nn.Linear(64, 48, bias=False, dtype=torch.bfloat16, device=dev)
    slower = nn.Linear(64, 64, bias=True, dtype=torch.float16, device=dev)
    assert gemv._compiled_is_faster(faster, x16.to(torch.bfloat16))
    assert not gemv._compiled_is_faster(slower, x16)
    assert gemv.report() == [
        "48x64 bfloat16: compiled 10.0 us, cuBLAS 12.5 us -> compiled",
        "64x64 +bias float16: compiled 9.0 us, cuBLAS 8.0 us -> cuBLAS"]

"""The elementwise work between an fp8 decoder layer's GEMMs, fused into as few kernels as the
layer's data flow allows.

Run one projection at a time (`Fp8Linear.forward`), a layer with fp8 weights launches around
each of its four GEMMs a per-token quantization of the input and a scaling pass over the output:
eight kernels per layer beside the two norms and SiLU-and-mul, each of which also reads and
writes every row again. At batch 1 they cost about what the fp8 GEMMs save (docs/fp8.md). Here
a GEMM's output scales apply inside the kernel that reads the output next, and that kernel also
quantizes the next GEMM's input:

    add_rmsnorm_quantize  residual += down_raw * s_x * s_w; xq, s = quantize(rmsnorm(residual))
    qkv GEMM              scaled as `Fp8Linear.gemm` does: RoPE and attention want bf16 q, k, v
    quantize_rows         the attention output, the o projection's input
    o GEMM
    add_rmsnorm_quantize  residual += o_raw * s_x * s_w; xq, s = quantize(rmsnorm(residual))
    gate_up GEMM
    silu_mul_quantize     xq, s = quantize(silu(gate) * up), gate | up = gate_up_raw * s_x * s_w
    down GEMM             carried to the next layer unscaled, as a `Pending`

Below `ROWWISE_MIN_M` rows (decode) every GEMM is the per-tensor fp8 GEMM with unit scales
(`Fp8Linear.gemm_unscaled`), the fastest fp8 GEMM there (docs/fp8.md); from it (prefill) the
row-wise GEMM applies the scales in its epilogue and the next kernel reads a finished output
(a `Pending` without scales). The functions are plain PyTorch, compiled into Triton kernels
on CUDA (`compiled_on_cuda`) and run as they are on CPU, where the tests compare them with the
unfused path.
`PDSERVE_FP8_FUSION=0` runs fp8 layers one projection at a time instead.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from engine.fp8_linear import (
    Fp8Linear,
    compiled_on_cuda,
    dequantize_output_compiled,
    quantize_rows,
    quantize_static,
)

PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


class Pending(NamedTuple):
    """A projection's output whose scales are not applied yet: raw [T, N] * x_scale [T, 1] *
    w_scale [N] (raw in bf16, or fp32 for an fp32 model; the scales float32). Both scales None:
    raw is the output itself (the row-wise GEMM applied them)."""

    raw: torch.Tensor
    x_scale: torch.Tensor | None
    w_scale: torch.Tensor | None

    def value(self, dtype: torch.dtype) -> torch.Tensor:
        """The output itself, [T, N] in `dtype` (for a consumer that is not fused)."""
        if self.x_scale is None:
            return self.raw.to(dtype)
        return dequantize_output_compiled(self.raw, self.x_scale, self.w_scale, None, dtype)


def fusable(layer: nn.Module) -> bool:
    """Whether `layer`'s four projections are all fp8 and the fused path is switched on (a
    checkpoint's `ignore` list may leave some layers in bf16: those run unfused)."""
    return (os.environ.get("PDSERVE_FP8_FUSION", "1") != "0"
            and all(isinstance(getattr(layer, p), Fp8Linear) for p in PROJECTIONS))


def _quantize(x: torch.Tensor, input_scale: torch.Tensor | None,
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (xq [M, K] float8_e4m3fn, scale [M, 1] float32): per token, or by the
    checkpoint's static scale [], as `Fp8Linear.quantize_input` does (here inside a fused
    kernel, so the plain functions, not their compiled wrappers)."""
    return quantize_rows(x) if input_scale is None else quantize_static(x, input_scale)


def add_rmsnorm_quantize_kernel(
        hidden: torch.Tensor, x_scale: torch.Tensor | None, w_scale: torch.Tensor | None,
        residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
        input_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """residual' = residual + hidden [* x_scale * w_scale], in residual's dtype (residual None:
    hidden is the residual stream as it is, layer 0's embeddings);
    -> (quantized rmsnorm(residual') * weight: xq [T, H] fp8 and its scale [T, 1]; residual').

    The norm reads the sum as stored, rounded to the model dtype, as the unfused layer does."""
    h = hidden.float()
    if x_scale is not None:
        h = h * x_scale * w_scale
    if residual is not None:
        h = residual.float() + h
    res = h.to(hidden.dtype if residual is None else residual.dtype)  # [T, H]
    r = res.float()
    normed = r * torch.rsqrt(r.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.float()
    xq, scale = _quantize(normed, input_scale)
    return xq, scale, res


def silu_mul_quantize_kernel(raw: torch.Tensor, x_scale: torch.Tensor | None,
                             w_scale: torch.Tensor | None, input_scale: torch.Tensor | None,
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused gate|up GEMM's output [T, 2I] (unscaled unless x_scale is None) ->
    quantize(silu(gate) * up): xq [T, I] fp8 and its scale [T, 1]."""
    gu = raw.float() if x_scale is None else raw.float() * x_scale * w_scale
    gate, up = gu.chunk(2, dim=-1)  # [T, I] each
    return _quantize(F.silu(gate) * up, input_scale)


_add_rmsnorm_quantize = compiled_on_cuda(add_rmsnorm_quantize_kernel)
_silu_mul_quantize = compiled_on_cuda(silu_mul_quantize_kernel)


def add_rmsnorm_quantize(hidden: torch.Tensor | Pending, residual: torch.Tensor | None,
                         norm: nn.Module, input_scale: torch.Tensor | None,
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """residual += hidden, then the next projection's input: norm(residual) quantized.
    -> (xq [T, H] fp8, scale [T, 1], the new residual [T, H]). `norm` has `weight` and `eps`."""
    if isinstance(hidden, Pending):
        return _add_rmsnorm_quantize(hidden.raw, hidden.x_scale, hidden.w_scale, residual,
                                     norm.weight, norm.eps, input_scale)
    return _add_rmsnorm_quantize(hidden, None, None, residual, norm.weight, norm.eps,
                                 input_scale)


def project(proj: Fp8Linear, xq: torch.Tensor, x_scale: torch.Tensor) -> Pending:
    """proj's GEMM (no bias) on an already quantized input, its scales left for the next
    kernel; from `ROWWISE_MIN_M` rows the row-wise GEMM applies them itself."""
    if proj.uses_rowwise(xq.shape[0]):
        return Pending(proj.gemm_rowwise(xq, x_scale), None, None)
    return Pending(proj.gemm_unscaled(xq), x_scale, proj.weight_scale)


def silu_mul_quantize(gate_up: Pending, input_scale: torch.Tensor | None,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The down projection's input from the gate|up projection's output: (xq, scale)."""
    return _silu_mul_quantize(gate_up.raw, gate_up.x_scale, gate_up.w_scale, input_scale)

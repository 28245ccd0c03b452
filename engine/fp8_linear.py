"""Fp8Linear: a linear layer whose weight is float8_e4m3fn with one float32 scale per output
channel, run by torch's fp8 GEMM (`torch._scaled_mm`: cuBLAS Lt / CUTLASS on sm89+, a
reference kernel on CPU). Activations are quantized per token at run time (one scale per row),
or with the checkpoint's static per-tensor `input_scale` when it has one.

    y[m, n] = sum_k xq[m, k] * wq[n, k] * s_x[m] * s_w[n]  (+ bias[n])

Two GEMM paths, picked per call by the number of rows M (measured in bench/gpu_fp8.py):
- small M: the per-tensor-scaled GEMM with unit scales, then one elementwise multiply by
  s_x[:, None] * s_w[None, :]. cuBLAS's per-tensor fp8 GEMM streams the weight at close to
  full bandwidth at M = 1..32, while its row-wise-scaled one is slower than bf16 there.
- large M (bf16 outputs only, the row-wise kernel's one output dtype): the row-wise-scaled
  GEMM, which applies both scales in its epilogue (no [M, N] pass afterwards).

Everything stays on the device (no `.item()`, no host sync), so the layer is CUDA-graph safe.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import nn

from engine.persistent_reductions import persistent_reductions

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448: e4m3fn has no inf, so values past it must be clamped
# Floor of a scale: an all-zero row (padding, a zero weight channel) would divide by zero.
MIN_SCALE = 1e-12
# Rows from which the row-wise-scaled GEMM is used: the first M at which its "layer rowwise"
# column of `python -m bench.gpu_fp8 --parts gemm` beats "layer tensor+mul" for the Llama-3-8B
# shapes. H200 (docs/fp8.md): tensor+mul faster up to M = 32, a tie at 128, rowwise at 512.
ROWWISE_MIN_M = 256


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (xq [M, K] float8_e4m3fn, scale [M, 1] float32), x ~= xq * scale per row."""
    amax = torch.linalg.vector_norm(x, ord=float("inf"), dim=-1, keepdim=True)  # [M, 1]
    scale = (amax.float() / FP8_MAX).clamp_(min=MIN_SCALE)
    return (x / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_static(x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] with one calibrated scale [] -> (xq [M, K] float8_e4m3fn, scale [M, 1])."""
    xq = (x / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return xq, scale.reshape(1, 1).expand(x.shape[0], 1).contiguous()


def dequantize_output(y: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                      bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """An unscaled fp8 GEMM's y [M, N] times x_scale [M, 1] and w_scale [N] (+ bias) in `dtype`."""
    out = y.float() * x_scale * w_scale
    if bias is not None:
        out = out + bias.float()
    return out.to(dtype)


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (wq [N, K] float8_e4m3fn, scale [N] float32): one scale per output channel,
    the channel's absolute maximum mapped to FP8_MAX."""
    amax = w.abs().amax(dim=1).float()  # [N]
    scale = (amax / FP8_MAX).clamp_(min=MIN_SCALE)
    wq = (w.float() / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return wq, scale


# Rows from which a compiled kernel keeps each row's reductions in one program (below it, inductor
# may split a reduction across programs). H200, SiLU-and-mul + quantize over the 32 layers
# (docs/fp8.md): at M = 1 one program per row took 290 us per step (run 65), split 247 us in
# three kernels (run 66); at M = 128 one program per row took 317 us (run 65), where the first
# version's split kernels (every size dynamic) took 796 us (run 64).
SPLIT_REDUCTIONS_BELOW_M = 64
# Rows from which that program also holds the whole row (engine/persistent_reductions.py), for
# rows of up to PDSERVE_FP8_PERSISTENT features (default 16384, the widest fp8 kernel's 14336;
# 0: never), instead of looping over it once per pass: prefill chunks. The GPU warm-up compiles
# this variant too (ModelRunner.warm_up_rowwise_fp8 runs ROWWISE_MIN_M rows).
PERSISTENT_FROM_M = ROWWISE_MIN_M


def _persistent_max_features() -> int:
    return int(os.environ.get("PDSERVE_FP8_PERSISTENT", "16384"))


def _variant(m: int) -> str:
    """Which compiled variant runs m rows: split, loop or persistent reductions."""
    if m < SPLIT_REDUCTIONS_BELOW_M:
        return "split"
    if m < PERSISTENT_FROM_M or _persistent_max_features() <= 0:
        return "loop"
    return "persistent"


def compiled_on_cuda(fn: Callable) -> Callable:
    """`fn` compiled by torch.compile on CUDA (one Triton kernel instead of 4-6 elementwise
    launches per layer: at batch 1 those launches cost as much as the GEMM saves), eager on CPU
    or with PDSERVE_FP8_COMPILE=0. `fn`'s first argument is [M, ...]. Compiles on first use,
    which the CUDA-graph warm-up runs ahead of capture; a failure to compile falls back to eager
    for good."""
    compiled: dict[str, Callable] = {}
    failed = []

    def run(*args):
        if not args[0].is_cuda or os.environ.get("PDSERVE_FP8_COMPILE", "1") == "0" or failed:
            return fn(*args)
        variant = _variant(args[0].shape[0])
        if variant not in compiled:
            # The persistent variant's graph and options would otherwise equal the loop
            # variant's, and Inductor's FX graph cache would hand it the loop's code. With a row
            # in registers, Inductor drops a bf16 round trip between fused ops (the residual the
            # norm reads) unless told to keep it: run 91 saw the norm's scales 1.2e-3 off eager.
            options = ({"split_reductions": False, "fx_graph_cache": False,
                        "emulate_precision_casts": True}
                       if variant == "persistent" else {"split_reductions": variant == "split"})
            compiled[variant] = torch.compile(fn, fullgraph=True, options=options)
        # Only the number of rows varies between calls (batch buckets, prefill chunks): that
        # dimension compiles dynamic and the feature sizes static. With every size dynamic
        # (dynamic=True), inductor cut a reduction over 14336 features into three kernels and
        # an intermediate in memory (run 64's profiles at M = 1 and 128, docs/fp8.md).
        for a in args:
            if isinstance(a, torch.Tensor) and a.dim() == 2:
                torch._dynamo.maybe_mark_dynamic(a, 0)
        context = (persistent_reductions(_persistent_max_features())
                   if variant == "persistent" else nullcontext())
        try:
            with context:
                return compiled[variant](*args)
        except Exception as e:  # noqa: BLE001 - e.g. no Triton in this install
            log.warning("fp8: torch.compile of %s failed (%s); running it eagerly", fn.__name__, e)
            failed.append(e)
            return fn(*args)

    return run


_quantize_rows = compiled_on_cuda(quantize_rows)
_quantize_static = compiled_on_cuda(quantize_static)
# also engine/fp8_fusion.py's, so that one compiled instance holds its torch.compile entries
dequantize_output_compiled = compiled_on_cuda(dequantize_output)


class Fp8Linear(nn.Module):
    """y = x @ (wq * s_w[:, None]).T + bias, in fp8 GEMMs; x and y in `out_dtype`.

    Buffers (not parameters: nothing here trains, and fp8 parameters trip autograd checks):
    weight [N, K] float8_e4m3fn, weight_scale [N] float32, bias [N] or None, and input_scale
    [] float32 when activations use a calibrated static scale (None: per token, dynamic).
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool,
                 out_dtype: torch.dtype, device: torch.device | str | None = None,
                 static_input_scale: bool = False) -> None:
        super().__init__()
        if in_features % 16 or out_features % 16:
            # torch._scaled_mm's fp8 GEMMs need both dimensions in multiples of 16
            raise ValueError(f"fp8 linear layers need in/out features in multiples of 16, got "
                             f"{in_features} -> {out_features}")
        self.in_features, self.out_features, self.out_dtype = in_features, out_features, out_dtype
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=FP8,
                                                   device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32,
                                                        device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=out_dtype, device=device)
                             if bias else None)
        # A shard-wise max is taken when q/k/v (gate/up) scales arrive one at a time: start at 0.
        self.register_buffer("input_scale", torch.zeros((), dtype=torch.float32, device=device)
                             if static_input_scale else None)
        self.register_buffer("_one", torch.ones((), dtype=torch.float32, device=device),
                             persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Fp8Linear:
        """Quantize a loaded nn.Linear (bf16/fp16/fp32) per output channel."""
        w = linear.weight.data
        mod = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                  out_dtype=w.dtype, device=w.device)
        wq, scale = quantize_weight(w)
        mod.weight.copy_(wq)
        mod.weight_scale.copy_(scale)
        if linear.bias is not None:
            mod.bias.copy_(linear.bias.data)
        return mod

    def dequantized_weight(self) -> torch.Tensor:
        """[N, K] float32: what the fp8 weight stands for (tests, accuracy checks)."""
        return self.weight.float() * self.weight_scale[:, None]

    def quantize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [M, K] -> (xq [M, K] float8_e4m3fn, scale [M, 1] float32): per token, or with the
        checkpoint's static input scale."""
        if self.input_scale is None:
            return _quantize_rows(x)
        return _quantize_static(x, self.input_scale)

    def gemm_unscaled(self, xq: torch.Tensor) -> torch.Tensor:
        """xq [M, K] fp8 -> sum_k xq[m, k] * wq[n, k] [M, N], no scale and no bias applied.

        The sums reach 448^2 * K: past float16's range, so they land in bf16 (or fp32 for an
        fp32 model) and the scales apply in float32 afterwards (`dequantize_output`, or a
        caller's fused kernel: engine/fp8_fusion.py)."""
        raw = torch.float32 if self.out_dtype == torch.float32 else torch.bfloat16
        # the weight transposed is [K, N] column-major, as _scaled_mm wants its second operand
        return torch._scaled_mm(xq, self.weight.t(), scale_a=self._one, scale_b=self._one,
                                out_dtype=raw)

    def uses_rowwise(self, m: int) -> bool:
        """Whether an input of m rows takes the row-wise-scaled GEMM (`gemm_rowwise`)."""
        return m >= ROWWISE_MIN_M and self.out_dtype == torch.bfloat16

    def gemm_rowwise(self, xq: torch.Tensor, x_scale: torch.Tensor) -> torch.Tensor:
        """xq [M, K] fp8, x_scale [M, 1] -> y [M, N] bf16, both scales applied in the GEMM's
        epilogue (its one output dtype is bf16); no bias."""
        return torch._scaled_mm(xq, self.weight.t(), scale_a=x_scale,
                                scale_b=self.weight_scale.view(1, -1), out_dtype=torch.bfloat16)

    def gemm(self, xq: torch.Tensor, x_scale: torch.Tensor) -> torch.Tensor:
        """xq [M, K] fp8, x_scale [M, 1] -> y [M, N] in out_dtype, scaled (+ bias): the
        row-wise GEMM from ROWWISE_MIN_M rows, below it the unscaled one and a scaling pass."""
        if self.uses_rowwise(xq.shape[0]):
            y = self.gemm_rowwise(xq, x_scale)
            return y if self.bias is None else y + self.bias
        return dequantize_output_compiled(self.gemm_unscaled(xq), x_scale, self.weight_scale,
                                          self.bias, self.out_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self.gemm(*self.quantize_input(x.reshape(-1, self.in_features)))  # [M, N]
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, static_input_scale={self.input_scale is not None}")

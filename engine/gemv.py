"""Projections of one row (batch-1 decode, a single logits row) as a tuned reduction kernel.

At one row a projection is a matrix-vector product: it reads the whole weight once and does
two flops per weight, so only the read bandwidth counts. cuBLAS's GEMM kernels fall short of it
at M = 1; Inductor, with `coordinate_descent_tuning`, lowers an M = 1 matmul to a multiply-and-
sum reduction over the input features and tunes its block sizes for the shape. On an H200, for
Llama-3-8B's projections over 32 layers plus lm_head, that took the step's weight reads from
3.93 ms (cuBLAS) to 3.64 ms (`python -m bench.gpu_gemv`, docs/benchmarks.md). The same kernels
with fp8 weights read slower than the fp8 GEMM (engine/fp8_linear.py), so fp8 layers keep it.

`linear(layer, x)` takes this path for an fp16/bf16 CUDA input of one row into an `nn.Linear`
of its dtype and is `layer(x)` for everything else. Each weight shape compiles once, on first
use; the CUDA-graph warm-up (engine/cuda_graph.py) runs that ahead of capture. A failure to
compile falls back to cuBLAS for good. `PDSERVE_GEMV=0` switches the path off (for comparisons).
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)
# Each (weight shape, bias or not, dtype) is one compiled entry of one function. Dynamo's
# default limit of 8 entries per function would be reached by two models in one process (5
# shapes each); past it the calls would run uncompiled, i.e. as cuBLAS, silently.
RECOMPILE_LIMIT = 64
_state: dict[str, object] = {}


def uses_gemv(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether `linear` runs x through the compiled reduction: one row, fp16/bf16, CUDA, and a
    plain linear layer of x's dtype (fp8 layers, engine/fp8_linear.py, keep their GEMM)."""
    return (x.dim() == 2 and x.shape[0] == 1 and x.is_cuda
            and x.dtype in (torch.float16, torch.bfloat16)
            and isinstance(layer, nn.Linear) and layer.weight.dtype == x.dtype
            and os.environ.get("PDSERVE_GEMV", "1") != "0" and "failed" not in _state)


def _compiled():
    fn = _state.get("fn")
    if fn is None:
        limit = getattr(torch._dynamo.config, "recompile_limit", None)
        if limit is not None and limit < RECOMPILE_LIMIT:
            torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
        fn = _state["fn"] = torch.compile(F.linear, fullgraph=True, dynamic=False,
                                          options={"coordinate_descent_tuning": True})
    return fn


def linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """layer(x) [M, out_features]; for one row on the GPU through the compiled reduction."""
    if not uses_gemv(layer, x):
        return layer(x)
    try:
        return _compiled()(x, layer.weight, layer.bias)
    except Exception as e:  # noqa: BLE001 - e.g. no Triton in this install
        log.warning("batch-1 projections fall back to cuBLAS: %s: %s", type(e).__name__, e)
        _state["failed"] = True
        return layer(x)

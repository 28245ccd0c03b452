"""Projections of one row (batch-1 decode, a single logits row) as a tuned reduction kernel.

At one row a projection is a matrix-vector product: it reads the whole weight once and does
two flops per weight, so only the read bandwidth counts. cuBLAS's GEMM kernels fall short of it
at M = 1; Inductor, with `coordinate_descent_tuning`, lowers an M = 1 matmul to a multiply-and-
sum reduction over the input features and tunes its block sizes for the shape. On an H200, for
Llama-3-8B's projections over 32 layers plus lm_head, that took the step's weight reads from
3.93 ms (cuBLAS) to 3.64 ms (`python -m bench.gpu_gemv`, docs/benchmarks.md). The same kernels
with fp8 weights read slower than the fp8 GEMM (engine/fp8_linear.py), so fp8 layers keep it.

`linear(layer, x)` takes this path for an fp16/bf16 CUDA input of one row into an `nn.Linear`
of its dtype, inside `for_cuda_graphs()`, and is `layer(x)` for everything else. The CUDA-graph
runner (engine/cuda_graph.py) warms up and captures its graphs inside it: a replay launches the
compiled kernels with no Python at all, whereas an eager step would pay Dynamo's dispatch on
each of its 129 projection calls (eager batch-1 steps took 31 ms against 15 ms with cuBLAS, run
70). Each weight shape compiles once, in the warm-up before its capture. A failure to compile
falls back to cuBLAS for good. `PDSERVE_GEMV=0` switches the path off (for comparisons).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)
# Each (weight shape, bias or not, dtype) is one compiled entry of one function. Dynamo's
# default limit of 8 entries per function would be reached by two models in one process (5
# shapes each); past it the calls would run uncompiled, i.e. as cuBLAS, silently.
RECOMPILE_LIMIT = 64
_state: dict[str, object] = {}
_scope = threading.local()  # .on: inside for_cuda_graphs() on this thread


@contextlib.contextmanager
def for_cuda_graphs() -> Iterator[None]:
    """The forwards inside (a CUDA graph's warm-up and capture) take the compiled path."""
    before = getattr(_scope, "on", False)
    _scope.on = True
    try:
        yield
    finally:
        _scope.on = before


def uses_gemv(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether `linear` runs x through the compiled reduction: one row, fp16/bf16, CUDA, and a
    plain linear layer of x's dtype (fp8 layers, engine/fp8_linear.py, keep their GEMM), inside
    `for_cuda_graphs()`."""
    return (getattr(_scope, "on", False) and x.dim() == 2 and x.shape[0] == 1 and x.is_cuda
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

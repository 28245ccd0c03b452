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
70). Each weight shape compiles once, in the warm-up before its capture, and then keeps
whichever of the compiled kernel and cuBLAS measured faster on it (`_compiled_is_faster`). A
failure to compile falls back to cuBLAS for good. `PDSERVE_GEMV=0` switches the path off (for
comparisons).
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
# (weight shape, bias, dtype, device) -> (compiled us, cuBLAS us) per call, as timed
_timings: dict[tuple, tuple[float, float]] = {}
TIMING_CALLS = 20
L2_FLUSH_BYTES = 64 << 20  # more than an H100/H200's 50 MB L2: each timed call reads from HBM
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


def _graph_us(fn, flush: torch.Tensor) -> float:
    """GPU us per call of fn, each call after an L2 flush (both in one CUDA graph, so neither
    Python nor launches are timed; the flush's cost is the same for every candidate). One call
    first, outside the capture: compiling and tuning, or cuBLAS's lazy set-up, happen there."""
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(TIMING_CALLS):
            flush.zero_()
            fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / TIMING_CALLS)
    return best


def _compiled_is_faster(layer: nn.Linear, x: torch.Tensor) -> bool:
    """Whether the compiled kernel beats cuBLAS on this layer's shape, timed once per shape.

    Coordinate-descent tuning times candidate configurations, and its pick varies between
    processes: over Llama-3-8B's projections the compiled kernels took 3.63 ms per step in one
    run and 4.11 ms in another, where cuBLAS took 3.8-3.9 ms (runs 70 and 72). So each shape
    keeps the compiled kernel only where it measured faster here.
    """
    key = (tuple(layer.weight.shape), layer.bias is not None, x.dtype, x.device)
    if key not in _timings:
        if torch.cuda.is_current_stream_capturing():
            return False  # first seen inside a capture (no warm-up ran it): cuBLAS
        fn = _compiled()
        flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=x.device)
        cublas = _graph_us(lambda: F.linear(x, layer.weight, layer.bias), flush)
        compiled = _graph_us(lambda: fn(x, layer.weight, layer.bias), flush)
        _timings[key] = (compiled, cublas)
        log.info("one-row projection %s", report()[-1])
    compiled, cublas = _timings[key]
    return compiled < cublas


def report() -> list[str]:
    """A line per timed shape: both kernels' time and the one kept (for benchmarks' logs)."""
    return [f"{shape[0]}x{shape[1]}{' +bias' if bias else ''} {str(dtype)[6:]}: compiled "
            f"{c:.1f} us, cuBLAS {b:.1f} us -> {'compiled' if c < b else 'cuBLAS'}"
            for (shape, bias, dtype, _), (c, b) in _timings.items()]


def linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """layer(x) [M, out_features]; for one row on the GPU through the compiled reduction
    where that measured faster than cuBLAS for the layer's shape."""
    if not uses_gemv(layer, x):
        return layer(x)
    try:
        if not _compiled_is_faster(layer, x):
            return layer(x)
        return _compiled()(x, layer.weight, layer.bias)
    except Exception as e:  # noqa: BLE001 - e.g. no Triton in this install
        log.warning("batch-1 projections fall back to cuBLAS: %s: %s", type(e).__name__, e)
        _state["failed"] = True
        return layer(x)

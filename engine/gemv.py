"""Projections of one row (batch-1 decode, a single logits row) as a tuned reduction kernel.

At one row a projection is a matrix-vector product: it reads the whole weight once and does
two flops per weight, so only the read bandwidth counts. cuBLAS's GEMM kernels fall short of it
at M = 1; Inductor, with `coordinate_descent_tuning`, lowers an M = 1 matmul to a multiply-and-
sum reduction over the input features and tunes its block sizes for the shape. On an H200, for
Llama-3-8B's projections over 32 layers plus lm_head, that took the step's weight reads from
3.93 ms (cuBLAS) to 3.64 ms (`python -m bench.gpu_gemv`, docs/benchmarks.md). The same kernels
with fp8 weights read slower than the fp8 GEMM (engine/fp8_linear.py), so fp8 layers keep it.

`linear(layer, x)` takes this path for an fp16/bf16 CUDA input of one row into an `nn.Linear`
of its dtype, inside `for_cuda_graphs()`, and is `layer(x)` for everything else.
`linear_silu_mul(layer, x, silu_and_mul)` is the MLP's gate_up projection with SiLU-and-mul as
the reduction's epilogue: the gate and up halves are two reductions over the same input, which
Inductor runs in one kernel, and each output feature is silu(gate) * up straight from its two
sums. At one row the separate SiLU-and-mul kernel cost 3.7 us per layer (run 73's profile),
about the kernel's launch latency in a graph, for 57 KB of data. The CUDA-graph
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
# (kind, weight shape, bias, dtype, device) -> (compiled us, baseline us) per call, as timed;
# kind "linear" (baseline: cuBLAS) or "linear+silu_and_mul" (baseline: `linear`, then the
# separate SiLU-and-mul kernel)
_timings: dict[tuple, tuple[float, float]] = {}
BASELINES = {"linear": "cuBLAS", "linear+silu_and_mul": "unfused"}
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


def gate_up_silu_mul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [M, H], weight [2I, H] (gate rows, then up rows) -> silu(x @ gate.T) * (x @ up.T)
    [M, I]: the gate_up projection and SiLU-and-mul, written for Inductor to fuse."""
    n = weight.shape[0] // 2
    return F.silu(F.linear(x, weight[:n])) * F.linear(x, weight[n:])


def _compile(name: str, fn):
    compiled = _state.get(name)
    if compiled is None:
        limit = getattr(torch._dynamo.config, "recompile_limit", None)
        if limit is not None and limit < RECOMPILE_LIMIT:
            torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
        compiled = _state[name] = torch.compile(fn, fullgraph=True, dynamic=False,
                                                options={"coordinate_descent_tuning": True})
    return compiled


def _compiled():
    return _compile("fn", F.linear)


def _compiled_silu():
    return _compile("silu_fn", gate_up_silu_mul)


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


def _faster(kind: str, layer: nn.Linear, x: torch.Tensor, compiled, baseline) -> bool:
    """Whether `compiled()` beats `baseline()` for this kind and layer shape, timed once per
    (kind, shape, bias, dtype, device).

    Coordinate-descent tuning times candidate configurations, and its pick varies between
    processes: over Llama-3-8B's projections the compiled kernels took 3.63 ms per step in one
    run and 4.11 ms in another, where cuBLAS took 3.8-3.9 ms (runs 70 and 72). So each shape
    keeps the compiled kernel only where it measured faster here.
    """
    key = (kind, tuple(layer.weight.shape), layer.bias is not None, x.dtype, x.device)
    if key not in _timings:
        if torch.cuda.is_current_stream_capturing():
            return False  # first seen inside a capture (no warm-up ran it): the baseline
        flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=x.device)
        base = _graph_us(baseline, flush)
        _timings[key] = (_graph_us(compiled, flush), base)
        log.info("one-row %s", report()[-1])
    compiled_us, base_us = _timings[key]
    return compiled_us < base_us


def _compiled_is_faster(layer: nn.Linear, x: torch.Tensor) -> bool:
    """Whether the compiled reduction beats cuBLAS on this layer's shape (timed once)."""
    fn = _compiled()
    return _faster("linear", layer, x, lambda: fn(x, layer.weight, layer.bias),
                   lambda: F.linear(x, layer.weight, layer.bias))


def _fused_silu_is_faster(layer: nn.Linear, x: torch.Tensor, silu_and_mul) -> bool:
    """Whether gate_up + SiLU-and-mul in one compiled kernel beats `linear` (whichever kernel
    it keeps) followed by `silu_and_mul` (timed once per shape)."""
    fn = _compiled_silu()
    return _faster("linear+silu_and_mul", layer, x, lambda: fn(x, layer.weight),
                   lambda: silu_and_mul(linear(layer, x)))


def report() -> list[str]:
    """A line per timed (kind, shape): both candidates' time and the one kept (for
    benchmarks' logs)."""
    return [f"{kind} {shape[0]}x{shape[1]}{' +bias' if bias else ''} {str(dtype)[6:]}: "
            f"compiled {c:.1f} us, {BASELINES[kind]} {b:.1f} us -> "
            f"{'compiled' if c < b else BASELINES[kind]}"
            for (kind, shape, bias, dtype, _), (c, b) in _timings.items()]


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
        _fail(e)
        return layer(x)


def linear_silu_mul(layer: nn.Module, x: torch.Tensor, silu_and_mul) -> torch.Tensor:
    """silu_and_mul(linear(layer, x)) [M, out_features // 2], for a gate_up layer (gate rows,
    then up rows); for one row on the GPU as one compiled kernel where that measured faster
    than the two steps."""
    if not uses_gemv(layer, x) or layer.bias is not None:
        return silu_and_mul(linear(layer, x))
    try:
        if _fused_silu_is_faster(layer, x, silu_and_mul):
            return _compiled_silu()(x, layer.weight)
    except Exception as e:  # noqa: BLE001 - as in `linear`
        _fail(e)
    return silu_and_mul(linear(layer, x))


def _fail(e: Exception) -> None:
    log.warning("batch-1 projections fall back to cuBLAS: %s: %s", type(e).__name__, e)
    _state["failed"] = True

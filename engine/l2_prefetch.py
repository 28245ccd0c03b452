"""Batch-1 decode: the o projection's weight read into L2 while RoPE and attention run.

At one row a layer's projections read their weights at the copy rate (engine/gemv.py), and
between the qkv and o projections HBM sits nearly idle: RoPE, the K/V append, attention over one
request and its split merge take ~12 us a layer and read ~4 MB (run 74's profile,
docs/benchmarks.md). `ahead(o_proj, x)` forks a side stream that reads the first rows of the o
projection's weight with L2's evict-last hint while that work runs on the main stream, and joins
it before the projection, which then finds those rows in L2. The read changes no value: the
same kernels compute the same numbers, only the weight's bytes arrive earlier.

Taken where engine/gemv.py's one-row path is (one row inside `gemv.for_cuda_graphs()`, i.e.
CUDA-graph warm-ups and captures; the fork and join are captured with the rest of the step).
`PDSERVE_L2_PREFETCH` is the share of the weight's rows read ahead (0 switches it off).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch
from torch import nn

from engine import gemv

BLOCK = 4096  # int32 words (16 KB) a program of the read kernel
_scratch: dict[tuple[torch.device, int], torch.Tensor] = {}
_streams: dict[torch.device, torch.cuda.Stream] = {}
calls = 0  # reads launched (tests check that the path ran)


def share() -> float:
    """The share of the weight's rows to read ahead, from PDSERVE_L2_PREFETCH."""
    return float(os.environ.get("PDSERVE_L2_PREFETCH", "0"))


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def read(ptr, out, n, BLOCK: tl.constexpr):
        # BLOCK words through L2 with the evict-last hint; a partial sum a program is stored so
        # that the loads are not dropped as dead code.
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        v = tl.load(ptr + offs, mask=offs < n, other=0, eviction_policy="evict_last")
        tl.store(out + pid, tl.sum(v, axis=0))

    return read


def read_into_l2(w: torch.Tensor, rows: int) -> None:
    """Read the first `rows` rows of the contiguous CUDA tensor w through L2 (one kernel)."""
    words = w[:rows].reshape(-1).view(torch.int32)
    programs = -(-words.numel() // BLOCK)
    key = (w.device, programs)
    if key not in _scratch:
        _scratch[key] = torch.empty(programs, dtype=torch.int32, device=w.device)
    _kernel()[(programs,)](words, _scratch[key], words.numel(), BLOCK=BLOCK)


@contextlib.contextmanager
def ahead(layer: nn.Module, x: torch.Tensor) -> Iterator[None]:
    """Inside: the main stream's work, with `layer`'s weight read into L2 beside it when x (one
    row, the step's) takes the one-row path and the share is above 0. On exit the main stream
    waits for the read."""
    global calls
    part = share()
    if part <= 0 or not gemv.uses_gemv(layer, x):
        yield
        return
    main = torch.cuda.current_stream(x.device)
    side = _streams.get(x.device)
    if side is None:
        side = _streams[x.device] = torch.cuda.Stream(x.device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        read_into_l2(layer.weight, max(1, int(layer.weight.shape[0] * min(part, 1.0))))
    calls += 1
    try:
        yield
    finally:
        main.wait_stream(side)

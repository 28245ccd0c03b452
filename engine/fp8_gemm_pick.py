"""The unscaled fp8 GEMM of CUDA-graph steps: torch's cuBLAS call, or FlashInfer's `mm_fp8` with
the cuBLASLt algorithm that FlashInfer's autotuner timed fastest; per shape, whichever is faster.

torch's `_scaled_mm` runs the first algorithm cuBLASLt's heuristic proposes. FlashInfer's
autotuner times each algorithm the heuristic lists (a CUDA graph each, cold L2) and keeps the
fastest. Over Llama-3-8B's four projections on an H200 that took 3-7% off the fp8 GEMMs at 1, 32
and 128 rows; but on down at 32 rows its pick ran 8% slower than torch's (run 107,
`python -m bench.gpu_gemm_libs`, docs/benchmarks.md). So, as engine/gemv.py does for one-row
projections, each (weight shape, rows) is timed once, in the warm-up before its capture, against
torch's call, and keeps the faster.

`gemm_unscaled` takes this choice inside `gemv.for_cuda_graphs()` (CUDA-graph warm-ups and
captures) for a CUDA input with a bf16 result; everywhere else it is torch's call, as it is with
`PDSERVE_FP8_GEMM=torch` (for comparisons) and for good after FlashInfer fails once.
"""

from __future__ import annotations

import logging
import os

import torch

from engine import gemv

log = logging.getLogger(__name__)
# (weight shape, rows, device) -> (FlashInfer us, torch us) per call, as timed
_timings: dict[tuple, tuple[float, float]] = {}
_failed: list[Exception] = []


def torch_gemm(xq: torch.Tensor, w: torch.Tensor, one: torch.Tensor,
               out_dtype: torch.dtype) -> torch.Tensor:
    """xq [M, K] fp8, w [N, K] fp8, one [] float32 -> [M, N] out_dtype, unit scales."""
    # the weight transposed is [K, N] column-major, as _scaled_mm wants its second operand
    return torch._scaled_mm(xq, w.t(), scale_a=one, scale_b=one, out_dtype=out_dtype)


def flashinfer_gemm(xq: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The same product in bf16 through FlashInfer's per-tensor fp8 GEMM (cuBLASLt), running
    the algorithm its autotuner picked for this shape if one was tuned, else the heuristic's."""
    import flashinfer

    return flashinfer.mm_fp8(xq, w, out_dtype=torch.bfloat16, backend="cublas")


def applies(xq: torch.Tensor, out_dtype: torch.dtype) -> bool:
    """Whether `gemm_unscaled` considers FlashInfer's GEMM for this call."""
    return (gemv.in_cuda_graph_scope() and xq.is_cuda and out_dtype == torch.bfloat16
            and os.environ.get("PDSERVE_FP8_GEMM", "pick") != "torch" and not _failed)


def _flashinfer_is_faster(xq: torch.Tensor, w: torch.Tensor, one: torch.Tensor) -> bool:
    """Tune FlashInfer's GEMM on this shape and time it against torch's, once per shape."""
    key = (tuple(w.shape), xq.shape[0], xq.device)
    if key not in _timings:
        if torch.cuda.is_current_stream_capturing():
            return False  # first seen inside a capture (no warm-up ran it): torch's call
        import flashinfer

        # Powers of two, the graphs' batch buckets (engine/cuda_graph.py), are FlashInfer's
        # own tuning buckets, so the graphs' calls find this tuning.
        with flashinfer.autotune(True, tuning_buckets=(xq.shape[0],)):
            flashinfer_gemm(xq, w)
        flush = torch.empty(gemv.L2_FLUSH_BYTES, dtype=torch.uint8, device=xq.device)
        # timed outside the tuning context, as the graphs will run it
        fi = gemv.graph_us(lambda: flashinfer_gemm(xq, w), flush)
        th = gemv.graph_us(lambda: torch_gemm(xq, w, one, torch.bfloat16), flush)
        _timings[key] = (fi, th)
        log.info("fp8 GEMM %s", report()[-1])
    fi, th = _timings[key]
    return fi < th


def report() -> list[str]:
    """A line per timed shape: both GEMMs' time and the one kept (for benchmarks' logs)."""
    return [f"{shape[0]}x{shape[1]} M={m}: FlashInfer {fi:.1f} us, torch {th:.1f} us -> "
            f"{'FlashInfer' if fi < th else 'torch'}"
            for (shape, m, _), (fi, th) in _timings.items()]


def gemm_unscaled(xq: torch.Tensor, w: torch.Tensor, one: torch.Tensor,
                  out_dtype: torch.dtype) -> torch.Tensor:
    """xq [M, K] fp8 @ w [N, K] fp8 -> [M, N] out_dtype, no scales: the faster of the two GEMMs
    for this shape inside CUDA-graph steps (`applies`), torch's call otherwise."""
    if applies(xq, out_dtype):
        try:
            if _flashinfer_is_faster(xq, w, one):
                return flashinfer_gemm(xq, w)
        except Exception as e:  # noqa: BLE001 - e.g. a kit whose FlashInfer cannot build it
            log.warning("fp8 GEMMs stay on torch's call: %s: %s", type(e).__name__, e)
            _failed.append(e)
    return torch_gemm(xq, w, one, out_dtype)

"""Decode-size projections: torch's cuBLAS call against FlashInfer's GEMM backends, autotuned.

At 32 and 128 rows cuBLAS reads Llama-3-8B's weights at 3.5 and 3.2 TB/s against a copy rate
of 4.2 (docs/benchmarks.md, run 101): 0.7 and 1.1 ms of a decode step. torch takes cuBLAS's
first heuristic pick; PyTorch's TunableOp offers nothing else on CUDA, and Inductor's Triton
templates tied (run 74). FlashInfer's `mm_bf16` can instead time every algorithm the cuBLASLt
heuristic lists for a shape (up to 100, each in a CUDA graph with a cold L2) and keep the
fastest, and has TinyGEMM, a small-M kernel from TensorRT-LLM; `mm_fp8` does the same for the
per-tensor fp8 GEMM that fp8 layers run at decode sizes (engine/fp8_linear.py).

Each row runs a projection over `--layers` layers' weights (distinct, more than L2 holds) back
to back in one CUDA graph and prints GPU ms, the weight bytes read per second, and the relative
error against torch's output. A backend the kit cannot build prints its error instead.

Run 107 (docs/benchmarks.md): bf16 ties torch. fp8 `mm_fp8` came out 3-7% faster, but that run
made torch's unit scale inside each timed call, so its torch rows also timed a fill kernel per
GEMM; timed one call at a time with the scale made once, the two fp8 GEMMs were within 2%, and
in the engine's decode steps the faster pick per shape changed nothing (run 109).

    python -m bench.gpu_gemm_libs [--rows 1,32,128] [--layers 32] [--backends cublaslt,tinygemm]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bench.gpu_floor import rel_err
from bench.gpu_gemv import SHAPES, graph_ms, row

FP8 = torch.float8_e4m3fn


def bf16_candidates(backends: list[str]) -> dict[str, Callable]:
    """name -> fn(x [M, K], w [N, K]) -> [M, N]: torch's call and each FlashInfer backend."""
    import flashinfer

    out: dict[str, Callable] = {"torch (cuBLAS)": F.linear}
    for b in backends:
        # mm_bf16 takes the weight as [K, N] column-major, i.e. our [N, K] transposed
        out[f"mm_bf16 {b}"] = lambda x, w, b=b: flashinfer.mm_bf16(x, w.t(), backend=b)
    return out


def fp8_candidates(device: torch.device) -> dict[str, Callable]:
    """name -> fn(x8 [M, K], w8 [N, K]) -> bf16 [M, N], unit scales: the engine's unscaled fp8
    GEMM (per-channel and per-token scales are applied after it) through torch and through
    FlashInfer's autotuned cuBLASLt."""
    import flashinfer

    # Made once, as the engine's `Fp8Linear._one` is: made per call, the timed graph would also
    # run a fill kernel before each GEMM (run 107 did; docs/benchmarks.md).
    one = torch.ones((), device=device)

    def torch_fp8(x8: torch.Tensor, w8: torch.Tensor) -> torch.Tensor:
        return torch._scaled_mm(x8, w8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)

    def fi_fp8(x8: torch.Tensor, w8: torch.Tensor) -> torch.Tensor:
        return flashinfer.mm_fp8(x8, w8, out_dtype=torch.bfloat16, backend="cublas")

    return {"torch _scaled_mm": torch_fp8, "mm_fp8 cublas": fi_fp8}


def time_candidates(name: str, cands: dict[str, Callable], x: torch.Tensor,
                    ws: list[torch.Tensor], bytes_per: int) -> dict[str, float]:
    """Tune each candidate on this shape (FlashInfer's autotuner, the bucket of exactly M rows),
    then time it over all layers; ms per candidate that ran."""
    import flashinfer

    n, (nout, k) = len(ws), ws[0].shape
    ref, out = None, {}
    for label, fn in cands.items():
        try:
            with flashinfer.autotune(True, tuning_buckets=(x.shape[0],)):
                got = fn(x, ws[0])
            ms = graph_ms(lambda i, fn=fn: fn(x, ws[i]), n)
        except Exception as e:  # noqa: BLE001 - a backend this kit cannot build: say which
            print(f"{name} {label}: {type(e).__name__}: {str(e).splitlines()[0][:120]}",
                  flush=True)
            continue
        ref = got.float() if ref is None else ref
        out[label] = ms
        row(f"{name} {label}", ms, n * nout * k * bytes_per, rel_err(got.float(), ref))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--rows", default="1,32,128", help="M values, comma-separated")
    ap.add_argument("--backends", default="cublaslt,tinygemm",
                    help="mm_bf16 backends to time against torch (cudnn needs cuDNN's "
                         "Python frontend, cutile cuda.tile; the GPU kit has neither)")
    ap.add_argument("--no-fp8", action="store_true")
    args = ap.parse_args()
    dev, bf16 = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    rows = [int(m) for m in args.rows.split(",")]
    bf16_c = bf16_candidates(args.backends.split(","))
    fp8_c = {} if args.no_fp8 else fp8_candidates(dev)
    totals: dict[tuple[int, str], float] = {}
    for name, (nout, k) in SHAPES.items():
        ws = [torch.randn(nout, k, device=dev, dtype=bf16) * 0.02 for _ in range(args.layers)]
        w8 = [(w / w.abs().amax() * 448).to(FP8) for w in ws] if fp8_c else []
        for m in rows:
            print(f"{f'{name}, M = {m}, {args.layers} layers':<36} {'GPU ms':>8} {'TB/s':>8} "
                  f"{'rel err':>10}", flush=True)
            x = torch.randn(m, k, device=dev, dtype=bf16)
            for label, ms in time_candidates(name, bf16_c, x, ws, 2).items():
                totals[m, label] = totals.get((m, label), 0.0) + ms
            if fp8_c:
                x8 = (x / x.abs().amax() * 448).to(FP8)
                for label, ms in time_candidates(name, fp8_c, x8, w8, 1).items():
                    totals[m, label] = totals.get((m, label), 0.0) + ms
        ws.clear()
        w8.clear()
        torch.cuda.empty_cache()
    print("a step's qkv, o, gate_up and down (ms, all layers):", flush=True)
    for (m, label), ms in sorted(totals.items()):
        print(f"  M = {m:<4} {label:<24} {ms:8.3f}", flush=True)


if __name__ == "__main__":
    main()

"""Batch-1 projections: cuBLAS against Inductor's matrix-vector kernel, Llama-3-8B shapes.

At one row a projection is a matrix-vector product, bound by reading the weight. With
`coordinate_descent_tuning`, Inductor lowers an M = 1 matmul to a multiply-and-sum reduction
and tunes its block sizes ("our matrix vector multiplies only achieve peak bandwidth with
coordinate descent tuning", torch/_inductor/decomposition.py); gpt-fast runs batch 1 that way.
A compiled reduction can also take the ops before it as its prologue: the RMSNorm before qkv,
SiLU-and-mul before down, fp8 weights' upcast and scales.

Each row runs a projection for `--layers` layers' weights (32 distinct weights: more than L2
holds) back to back in one CUDA graph and prints GPU ms for all of them, the weight bytes read
per second, and the relative error against the eager path's output.

    python -m bench.gpu_gemv [--layers 32] [--rows 1]

`--rows 32` or `128` asks the same of batched decode: there Inductor autotunes its Triton GEMM
templates against cuBLAS (`max_autotune`) and keeps the faster, so its row is at most cuBLAS's
(run 74, M = 32: 4.141 ms for a step's projections against cuBLAS's 4.129 ms, so no lever for
issue 12's B = 32 target).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bench import gpu_floor
from bench.gpu_floor import rel_err

H, I, Q = 4096, 14336, 6144  # hidden, intermediate, q + k + v features of Llama-3-8B
SHAPES = {"qkv": (Q, H), "o": (H, H), "gate_up": (2 * I, H), "down": (H, I)}
VOCAB = 128256  # lm_head: 1 GB; 4 copies, timed per copy
TUNED = {"coordinate_descent_tuning": True}


def graph_ms(fn: Callable[[int], torch.Tensor], layers: int) -> float:
    """GPU ms of one CUDA-graph replay of fn(0), ..., fn(layers - 1)."""
    return gpu_floor.graph_ms(lambda: [fn(i) for i in range(layers)], reps=30)


def rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    g, u = gu.chunk(2, dim=-1)
    return F.silu(g) * u


def fp8_linear(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Weight-only fp8: the fp8 weight upcast inside the reduction, per-channel scales after."""
    return F.linear(x, w8.to(x.dtype)) * scale


def row(name: str, ms: float, nbytes: int, err: float | None = None) -> None:
    e = "" if err is None else f"{err:10.2e}"
    print(f"{name:<36} {ms:8.3f} {nbytes / ms / 1e9:8.2f} {e}", flush=True)


def prologue_rows(name: str, x: torch.Tensor, ws: list[torch.Tensor]) -> None:
    """The kernel before qkv (RMSNorm) or down (SiLU-and-mul): eager then cuBLAS, against one
    compiled kernel that computes it on the way into the reduction."""
    n, (nout, k) = len(ws), ws[0].shape
    if name == "qkv":
        pro, nw = "rmsnorm", torch.randn(k, device=x.device, dtype=x.dtype)
        fused = torch.compile(lambda x, nw, w: F.linear(rmsnorm(x, nw), w), dynamic=False,
                              options=TUNED)

        def eager(i: int) -> torch.Tensor:
            return F.linear(rmsnorm(x, nw), ws[i])

        def call(i: int) -> torch.Tensor:
            return fused(x, nw, ws[i])
    else:
        pro, gu = "silu_mul", torch.randn(1, 2 * k, device=x.device, dtype=x.dtype)
        fused = torch.compile(lambda gu, w: F.linear(silu_mul(gu), w), dynamic=False,
                              options=TUNED)

        def eager(i: int) -> torch.Tensor:
            return F.linear(silu_mul(gu), ws[i])

        def call(i: int) -> torch.Tensor:
            return fused(gu, ws[i])
    err = rel_err(call(0), eager(0))
    row(f"{pro} + {name} eager + cuBLAS", graph_ms(eager, n), n * nout * k * 2)
    row(f"{pro} + {name} Inductor, one kernel", graph_ms(call, n), n * nout * k * 2, err)


def fp8_rows(name: str, x: torch.Tensor, ws: list[torch.Tensor]) -> None:
    """fp8 weights (per-channel scales): cuBLAS's per-tensor GEMM (the engine's path below
    ROWWISE_MIN_M, engine/fp8_linear.py) against Inductor's weight-only reduction."""
    n, (nout, k) = len(ws), ws[0].shape
    fp8, bf16 = torch.float8_e4m3fn, torch.bfloat16
    w8 = [(w / w.abs().amax(1, keepdim=True) * 448).to(fp8) for w in ws]
    scale = (ws[0].abs().amax(1) / 448).float()
    x8, one = x.to(fp8), torch.ones((), device=x.device)
    wo = torch.compile(fp8_linear, dynamic=False, options=TUNED)

    def scaled(i: int) -> torch.Tensor:
        return torch._scaled_mm(x8, w8[i].t(), scale_a=one, scale_b=one, out_dtype=bf16)

    def weight_only(i: int) -> torch.Tensor:
        return wo(x, w8[i], scale)

    row(f"{name} fp8 _scaled_mm per-tensor", graph_ms(scaled, n), n * nout * k)
    row(f"{name} fp8 weight-only Inductor", graph_ms(weight_only, n), n * nout * k,
        rel_err(weight_only(0), F.linear(x, w8[0].to(bf16)) * scale))


def projection_rows(name: str, ws: list[torch.Tensor], inductor, m: int = 1,
                    ) -> dict[str, float]:
    """cuBLAS against Inductor for one projection over every layer's weight at m rows; their
    ms. At one row also the prologue-fused and fp8 variants."""
    n, (nout, k) = len(ws), ws[0].shape
    x = torch.randn(m, k, device=ws[0].device, dtype=ws[0].dtype)
    ref, out = F.linear(x, ws[0]), {}
    for label, fn in (("cuBLAS", F.linear), ("Inductor", inductor)):
        out[label] = graph_ms(lambda i, fn=fn: fn(x, ws[i]), n)
        row(f"{name} {label}", out[label], n * nout * k * 2, rel_err(fn(x, ws[0]), ref))
    if m == 1 and name in ("qkv", "down"):
        prologue_rows(name, x, ws)
    if m == 1 and name != "lm_head":
        fp8_rows(name, x, ws)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--rows", type=int, default=1,
                    help="M; above 1 Inductor autotunes its Triton GEMM templates against "
                         "cuBLAS (max_autotune) instead of the one-row reduction")
    args = ap.parse_args()
    dev, bf16 = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    print(f"{f'M = {args.rows}, all layers':<36} {'GPU ms':>8} {'TB/s':>8} {'rel err':>10}")
    options = TUNED if args.rows == 1 else {"max_autotune": True,
                                            "max_autotune_gemm_backends": "TRITON,ATEN"}
    inductor = torch.compile(F.linear, dynamic=False, options=options)
    total = {"cuBLAS": 0.0, "Inductor": 0.0}
    shapes = {**SHAPES, "lm_head": (VOCAB, H)}
    for name, (nout, k) in shapes.items():
        layers = 4 if name == "lm_head" else args.layers
        ws = [torch.randn(nout, k, device=dev, dtype=bf16) * 0.02 for _ in range(layers)]
        for label, ms in projection_rows(name, ws, inductor, args.rows).items():
            total[label] += ms / layers * (1 if name == "lm_head" else args.layers)
        ws.clear()
        torch.cuda.empty_cache()
    print(f"one step's projections ({args.layers} layers + lm_head): cuBLAS "
          f"{total['cuBLAS']:.3f} ms, Inductor {total['Inductor']:.3f} ms", flush=True)


if __name__ == "__main__":
    main()

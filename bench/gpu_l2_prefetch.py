"""Batch-1 decode: can a projection's weight be read into L2 while attention runs, and does its
matrix-vector product then run faster?

At one row a decode layer's small kernels (norms, RoPE, the K/V append, attention over one
request and its split merge, SiLU-and-mul) leave HBM nearly idle for ~24 us a layer (run 74's
profile), while each projection reads its weight at the copy rate. This measures, per
projection and share of its rows, the product (Inductor's one-row reduction, engine/gemv.py):
- `cold`: alone, its weight in HBM (32 layers' distinct weights, more than L2 holds);
- `after a read`: right after a kernel that read the same rows (a Triton load with L2's
  evict-last hint), i.e. the product with those rows in L2, the read's own time subtracted;
- `overlapped`: a stand-in for attention (a spin kernel of `--spin-us` on the main stream) with
  the read forked onto a side stream, joined before the product; against the same stand-in and
  product without the read. The difference is what the trick would save a layer.

    python -m bench.gpu_l2_prefetch [--spin-us 12] [--fractions 1,0.5]

Run 112 (docs/benchmarks.md): from L2 the o projection took 9.9 us against 11.9 from HBM, and
overlapped with a 12 us stand-in the read saved 1.3 us a layer; every larger weight lost. In
the engine (o's weight read beside RoPE and attention, a side stream in the captured graph) the
B = 1 step moved within its run-to-run spread, so the engine does not do it.
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from bench.gpu_floor import graph_ms
from bench.gpu_gemv import SHAPES
from engine import gemv

LAYERS = 32
BLOCK = 4096  # int32 words (16 KB) a program of the read kernel


@triton.jit
def _read(ptr, out, n, BLOCK: tl.constexpr):
    # BLOCK words through L2 with the evict-last hint; a partial sum a program is stored so that
    # the loads are not dropped as dead code.
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(ptr + offs, mask=offs < n, other=0, eviction_policy="evict_last")
    tl.store(out + pid, tl.sum(v, axis=0))


_scratch: dict[int, torch.Tensor] = {}


def read_into_l2(w: torch.Tensor, rows: int) -> None:
    """Read the first `rows` rows of the contiguous CUDA tensor w through L2 (one kernel)."""
    words = w[:rows].reshape(-1).view(torch.int32)
    programs = triton.cdiv(words.numel(), BLOCK)
    if programs not in _scratch:
        _scratch[programs] = torch.empty(programs, dtype=torch.int32, device=w.device)
    _read[(programs,)](words, _scratch[programs], words.numel(), BLOCK=BLOCK)


def spin_cycles(us: float) -> int:
    """Clock cycles of `us` microseconds at the device's clock."""
    return int(us * torch.cuda.get_device_properties(0).clock_rate / 1e3)


def measure(fn, ws: list[torch.Tensor], x: torch.Tensor, rows: int, cycles: int,
            side: torch.cuda.Stream) -> tuple[float, float, float, float]:
    """us a layer: (the product after a read of `rows` rows, the read alone, spin + product,
    spin with the read forked beside it + product)."""
    read = graph_ms(lambda: [read_into_l2(w, rows) for w in ws]) / LAYERS * 1e3
    both = graph_ms(lambda: [(read_into_l2(w, rows), fn(x, w)) for w in ws])

    def plain() -> None:
        for w in ws:
            torch.cuda._sleep(cycles)
            fn(x, w)

    def forked() -> None:
        for w in ws:
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                read_into_l2(w, rows)
            torch.cuda._sleep(cycles)
            torch.cuda.current_stream().wait_stream(side)
            fn(x, w)

    spin = graph_ms(plain) / LAYERS * 1e3
    return both / LAYERS * 1e3 - read, read, spin, graph_ms(forked) / LAYERS * 1e3


def cold_us(fn, ws: list[torch.Tensor], x: torch.Tensor) -> float:
    """us a layer of the product with its weight in HBM (graph_ms's warm-up call, before the
    capture, compiles and tunes it)."""
    return graph_ms(lambda: [fn(x, w) for w in ws]) / LAYERS * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spin-us", type=float, default=12.0)
    ap.add_argument("--fractions", default="1,0.5")
    args = ap.parse_args()
    dev, bf16 = torch.device("cuda"), torch.bfloat16
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}: L2 {props.L2_cache_size / 2**20:.0f} MiB", flush=True)
    fn = gemv._compiled()
    side = torch.cuda.Stream()
    cycles = spin_cycles(args.spin_us)
    print(f"{'projection':<10} {'rows':>6} {'MB':>6} {'cold us':>8} {'after read':>11} "
          f"{'read us':>8} {'spin+mv':>8} {'spin|read+mv':>13} {'saved us':>9}", flush=True)
    for name, (nout, k) in SHAPES.items():  # weights [out, in]
        ws = [torch.randn(nout, k, device=dev, dtype=bf16) * 0.02 for _ in range(LAYERS)]
        x = torch.randn(1, k, device=dev, dtype=bf16)
        cold = cold_us(fn, ws, x)
        for frac in (float(f) for f in args.fractions.split(",")):
            rows = max(1, int(nout * frac))
            after, read, spin, over = measure(fn, ws, x, rows, cycles, side)
            print(f"{name:<10} {rows:>6} {rows * k * 2 / 1e6:6.1f} {cold:8.1f} {after:11.1f} "
                  f"{read:8.1f} {spin:8.1f} {over:13.1f} {spin - over:9.1f}", flush=True)
        ws.clear()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

"""Build FlashInfer's JIT modules for the GPU tests and benchmarks, several at once.

A fresh GPU machine compiles each kernel family on first use, one after another (minutes);
started here as parallel processes they share the machine's cores. Idempotent: modules
already in the cache load at once.

    python -m bench.gpu_jit            # all parts in parallel, then a check in this process
    python -m bench.gpu_jit --fp8      # the fp8-KV variants (docs/fp8.md), in parallel
"""

from __future__ import annotations

import subprocess
import sys
import time

import torch


def _backend(hq: int, hkv: int, d: int, kv_dtype: torch.dtype | None = None):
    from engine.attention.flashinfer_backend import FlashInferBackend

    return FlashInferBackend(num_q_heads=hq, num_kv_heads=hkv, head_dim=d, dtype=torch.bfloat16,
                             device="cuda", page_size=16, kv_dtype=kv_dtype)


def _run_prefill(backend, decode: bool) -> None:
    from engine.attention.metadata import build_metadata

    dev = backend.device
    cache = torch.randn(4, 2, 16, backend.num_kv_heads, backend.head_dim, device=dev).to(
        torch.bfloat16)
    new = [1, 1] if decode else [20, 1]
    meta = build_metadata([[0, 1], [2]], [16, 2] if decode else [0, 2], new, 16, dev)
    plan = backend.plan(meta)
    t = sum(new)
    q = torch.randn(t, backend.num_q_heads, backend.head_dim, device=dev).to(torch.bfloat16)
    k = torch.randn(t, backend.num_kv_heads, backend.head_dim, device=dev).to(torch.bfloat16)
    plan.forward(0, q, k, k.clone(), cache)
    torch.cuda.synchronize()


def _fused_ops() -> None:
    import engine.model as m

    fi = m.fused_kernels(torch.empty(1, device="cuda", dtype=torch.bfloat16))
    x = torch.randn(4, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.ones(4096, device="cuda", dtype=torch.bfloat16)
    fi.norm.rmsnorm(x, w, 1e-5)
    fi.norm.fused_add_rmsnorm(x, x.clone(), w, 1e-5)
    fi.activation.silu_and_mul(torch.randn(4, 256, device="cuda", dtype=torch.bfloat16))
    qkv = torch.randn(4, 48, 128, device="cuda", dtype=torch.bfloat16)
    cache = torch.randn(64, 128, device="cuda")
    pos = torch.arange(4, device="cuda")
    fi.rope.apply_rope_with_cos_sin_cache_inplace(pos, qkv[:, :32], qkv[:, 32:40], 128, cache)
    from flashinfer.cascade import merge_state_in_place

    o, s = torch.randn(4, 8, 128, device="cuda", dtype=torch.bfloat16), torch.randn(4, 8,
                                                                                   device="cuda")
    merge_state_in_place(o, s, o.clone(), s.clone())
    torch.cuda.synchronize()


PARTS = {
    "prefill128": lambda: _run_prefill(_backend(32, 8, 128), decode=False),
    "decode128": lambda: _run_prefill(_backend(32, 8, 128), decode=True),
    "fused": _fused_ops,
    "tiny64": lambda: _backend(8, 2, 64).warmup(),  # the tiny llama of tests/gpu
}
# bf16 queries over fp8 pages: prefill, decode and cascade kernels (each backend's warm-up)
FP8_PARTS = {
    "fp8_128": lambda: _backend(32, 8, 128, torch.float8_e4m3fn).warmup(),
    "fp8_64": lambda: _backend(8, 2, 64, torch.float8_e4m3fn).warmup(),
}


def main() -> None:
    fp8 = sys.argv[1:] == ["--fp8"]
    if len(sys.argv) > 1 and not fp8:
        {**PARTS, **FP8_PARTS}[sys.argv[1]]()
        return
    t0 = time.perf_counter()
    procs = {name: subprocess.Popen([sys.executable, "-m", "bench.gpu_jit", name])
             for name in (FP8_PARTS if fp8 else PARTS)}
    for name, p in procs.items():
        print(f"jit {name}: rc {p.wait()} at {time.perf_counter() - t0:.0f} s", flush=True)
    _backend(32, 8, 128, torch.float8_e4m3fn if fp8 else None).warmup()  # anything left
    print(f"jit done in {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()

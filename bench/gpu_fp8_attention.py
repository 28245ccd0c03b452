"""Decode attention over bf16 vs fp8 KV pages: which FlashInfer kernel reads fp8 pages fastest.

One layer of Llama-3-8B's attention (32 query heads, 8 KV heads x 128, page size 16), B requests
of C tokens each, one query token per request: the decode wrapper with tensor cores (what the
engine uses for bf16), without them (CUDA-core kernel), for bf16 and float8_e4m3fn pages. GPU
time per call (CUDA events) and the KV bytes it reads per second.

A last row per (B, context) tries FlashInfer's FA3 kernel over the fp8 pages with fp8 queries
(its fp8 kernels take fp8 queries only; unit scales, the pages' KV_FP8_SCALE): its time, and the
relative error of its output against FA2's bf16-query output over the same pages. FA2's fp8
path reads the pages at 1.5-2.3 TB/s (docs/fp8.md, run 33), so this says whether fp8 queries
would buy the bandwidth back. A failure there (an API the kit does not have) prints the error
and the benchmark goes on.

    python -m bench.gpu_fp8_attention [--batch-sizes 32,128] [--contexts 1024,4096]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from bench.gpu_floor import cuda_time_ms, rel_err

HQ, HKV, D, PS = 32, 8, 128, 16


def pages(b: int, ctx: int, kv_dtype: torch.dtype, page_size: int = PS, layout: str = "NHD"):
    """(cache, kv_indptr, kv_indices, kv_last_page_len, workspace): b requests of ctx tokens
    on shuffled pages of `page_size` tokens, each page [2, page_size, HKV, D] ("NHD", the
    engine's layout) or [2, HKV, page_size, D] ("HND")."""
    dev = torch.device("cuda")
    pages = -(-ctx // page_size)
    torch.manual_seed(0)
    page = (page_size, HKV, D) if layout == "NHD" else (HKV, page_size, D)
    cache = torch.randn(b * pages, 2, *page, device=dev).to(kv_dtype)
    indptr = torch.arange(b + 1, dtype=torch.int32) * pages
    indices = torch.randperm(b * pages, device=dev).to(torch.int32)
    last = torch.full((b,), (ctx - 1) % page_size + 1, dtype=torch.int32)
    ws = torch.zeros(128 * 1024 * 1024, dtype=torch.uint8, device=dev)
    return cache, indptr, indices, last, ws


def query(b: int) -> torch.Tensor:
    """b decode queries [b, HQ, D] bf16, the same in every call (seeded)."""
    torch.manual_seed(1)
    return torch.randn(b, HQ, D, device="cuda", dtype=torch.bfloat16)


def decode_call(b: int, ctx: int, kv_dtype: torch.dtype, tensor_cores: bool,
                ) -> Callable[[], torch.Tensor]:
    """One call of the planned FA2 decode wrapper over the pages, bf16 queries."""
    import flashinfer

    cache, indptr, indices, last, ws = pages(b, ctx, kv_dtype)
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=tensor_cores,
                                                      backend="fa2")
    w.plan(indptr, indices, last, HQ, HKV, D, PS, q_data_type=torch.bfloat16,
           kv_data_type=kv_dtype, sm_scale=D ** -0.5)
    q = query(b)
    return lambda: w.run(q, cache)


def time_fa3_fp8_queries(b: int, ctx: int) -> float:
    """ms per call of FA3 over fp8 pages with fp8 queries (one query per request, unit
    scales); prints its relative error against FA2 with bf16 queries over the same pages."""
    import flashinfer

    fp8 = torch.float8_e4m3fn
    cache, indptr, indices, last, ws = pages(b, ctx, fp8)
    w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", backend="fa3")
    w.plan(torch.arange(b + 1, dtype=torch.int32), indptr, indices, last, HQ, HKV, D, PS,
           causal=False, q_data_type=fp8, kv_data_type=fp8, o_data_type=torch.bfloat16,
           sm_scale=D ** -0.5)
    q = query(b)
    q8 = q.clamp(-448, 448).to(fp8)
    ones = [torch.ones(n, device="cuda", dtype=torch.float32) for n in (HQ, HKV, HKV)]
    ms = cuda_time_ms(lambda: w.run(q8, cache, *ones), reps=30)
    ref = decode_call(b, ctx, fp8, True)()
    err = rel_err(w.run(q8, cache, *ones), ref)
    print(f"       FA3 fp8 queries: relative error {err:.4f} against FA2 bf16 queries")
    return ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", default="32,128")
    ap.add_argument("--contexts", default="1024,4096")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), flush=True)
    print(f"{'B':>4} {'ctx':>6} {'kv':>5} {'tensor cores':>13} {'ms/layer':>9} {'KV TB/s':>8}")
    for b in (int(x) for x in args.batch_sizes.split(",")):
        for ctx in (int(x) for x in args.contexts.split(",")):
            for kv_dtype in (torch.bfloat16, torch.float8_e4m3fn):
                for tc in (True, False):
                    ms = cuda_time_ms(decode_call(b, ctx, kv_dtype, tc), reps=30)
                    kv_bytes = b * ctx * 2 * HKV * D * kv_dtype.itemsize
                    name = "bf16" if kv_dtype == torch.bfloat16 else "fp8"
                    print(f"{b:>4} {ctx:>6} {name:>5} {str(tc):>13} {ms:9.4f} "
                          f"{kv_bytes / ms / 1e9:8.2f}", flush=True)
                    torch.cuda.empty_cache()
            try:
                ms = time_fa3_fp8_queries(b, ctx)
                print(f"{b:>4} {ctx:>6} {'fp8':>5} {'FA3, fp8 q':>13} {ms:9.4f} "
                      f"{b * ctx * 2 * HKV * D / ms / 1e9:8.2f}", flush=True)
            except Exception as e:  # noqa: BLE001 - report and go on (see the docstring)
                print(f"{b:>4} {ctx:>6} {'fp8':>5} {'FA3, fp8 q':>13} failed: "
                      f"{type(e).__name__}: {e}", flush=True)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

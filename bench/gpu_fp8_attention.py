"""Decode attention over bf16 vs fp8 KV pages: which FlashInfer kernel reads fp8 pages fastest.

One layer of Llama-3-8B's attention (32 query heads, 8 KV heads x 128, page size 16), B requests
of C tokens each, one query token per request: the decode wrapper with tensor cores (what the
engine uses for bf16), without them (CUDA-core kernel), for bf16 and float8_e4m3fn pages. GPU
time per call (CUDA events) and the KV bytes it reads per second.

    python -m bench.gpu_fp8_attention [--batch-sizes 32,128] [--contexts 1024,4096]
"""

from __future__ import annotations

import argparse

import torch

from bench.gpu_floor import cuda_time_ms

HQ, HKV, D, PS = 32, 8, 128, 16


def time_decode(b: int, ctx: int, kv_dtype: torch.dtype, tensor_cores: bool) -> float:
    import flashinfer

    dev = torch.device("cuda")
    pages = -(-ctx // PS)
    cache = torch.randn(b * pages, 2, PS, HKV, D, device=dev).to(kv_dtype)
    indptr = torch.arange(b + 1, dtype=torch.int32) * pages
    indices = torch.randperm(b * pages, device=dev).to(torch.int32)
    last = torch.full((b,), (ctx - 1) % PS + 1, dtype=torch.int32)
    ws = torch.zeros(128 * 1024 * 1024, dtype=torch.uint8, device=dev)
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=tensor_cores,
                                                      backend="fa2")
    w.plan(indptr, indices, last, HQ, HKV, D, PS, q_data_type=torch.bfloat16,
           kv_data_type=kv_dtype, sm_scale=D ** -0.5)
    q = torch.randn(b, HQ, D, device=dev, dtype=torch.bfloat16)
    return cuda_time_ms(lambda: w.run(q, cache), reps=30)


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
                    ms = time_decode(b, ctx, kv_dtype, tc)
                    kv_bytes = b * ctx * 2 * HKV * D * kv_dtype.itemsize
                    name = "bf16" if kv_dtype == torch.bfloat16 else "fp8"
                    print(f"{b:>4} {ctx:>6} {name:>5} {str(tc):>13} {ms:9.4f} "
                          f"{kv_bytes / ms / 1e9:8.2f}", flush=True)
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

"""A decode step's RoPE and K/V write per layer: the engine's kernels against the candidates.

Llama-3-8B's heads (32 query, 8 KV, 128 dims), page size 16, B rows each writing one token's
K/V into its own page (the fused qkv output, as the model has it). 32 calls (a step's layers)
are replayed in one CUDA graph; GPU us per call. Write variants (K and V only):
- `index_put`: one advanced-indexing kernel over [page, :, offset] (the engine's store until
  run 74; fp8 pools still take it);
- `index_copy`: the pool viewed as rows of Hkv x D, the 2B rows copied by `index_copy_`;
- `append`: FlashInfer's `append_paged_kv_cache`, each row its own one-page "request" (int32
  page / offset buffers, as a graph replays them);
- `engine`: the engine's `KVWrite` (engine/attention/flashinfer_plans.py), which is `append`
  since run 74;
- into an fp8 pool: `fp8 index_put` (saturate, cast, one advanced-indexing kernel: the engine's
  store until run 90) and `fp8 engine` (`KVWrite`: one compiled saturate-and-cast kernel for K
  and V, then `append`).
RoPE + write variants:
- `rope+engine`: FlashInfer's in-place RoPE on q and k, then `KVWrite` (what steps run);
- `compiled`: RoPE and the write in one torch.compile'd function (Inductor: the rotated q as a
  new tensor, K/V scattered into the pool); `compiled+combo` lets Inductor combine its
  independent kernels into one launch (`combo_kernels`).

    python -m bench.gpu_kv_write [--batch-sizes 1,32,128]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from bench.gpu_floor import graph_ms
from bench.gpu_fp8_attention import HKV, HQ, PS, D
from engine.attention.base import FP8_KV, store_kv
from engine.attention.flashinfer_plans import KVWrite

LAYERS = 32
Q, KV = HQ * D, HKV * D


def rope_write(qkv: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
               cache: torch.Tensor, page: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Neox RoPE on q and k of qkv [T, Q + 2 KV], K/V written at [page, :, offset]; -> q
    rotated [T, HQ, D]. cos_sin [positions, D] float32: D/2 cosines, then D/2 sines."""
    t, half = qkv.shape[0], D // 2
    q, k, v = (y.view(t, -1, D) for y in qkv.split([Q, KV, KV], dim=-1))
    cs = cos_sin[positions]
    cos, sin = cs[:, None, :half], cs[:, None, half:]

    def rot(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[..., :half].float(), x[..., half:].float()
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    cache[page, 0, offset] = rot(k)
    cache[page, 1, offset] = v
    return rot(q)


def variants(b: int) -> dict[str, Callable[[], object]]:
    import flashinfer

    dev = torch.device("cuda")
    torch.manual_seed(0)
    n_pages = max(64, 2 * b)
    cache = torch.zeros(n_pages, 2, PS, HKV, D, device=dev, dtype=torch.bfloat16)
    qkv = torch.randn(b, Q + 2 * KV, device=dev, dtype=torch.bfloat16)
    page = torch.randperm(n_pages, device=dev)[:b]
    offset = torch.randint(0, PS, (b,), device=dev)
    positions = torch.randint(0, 1024, (b,), device=dev)
    cos_sin = torch.randn(4096, D, device=dev)
    q, k, v = (y.view(b, -1, D) for y in qkv.split([Q, KV, KV], dim=-1))
    page32, offset32 = page.int(), offset.int()
    indptr = torch.arange(b + 1, device=dev, dtype=torch.int32)  # batch indices: indptr[:b]
    write = KVWrite.from_slots(page * PS + offset, PS, indptr, flashinfer.append_paged_kv_cache)
    kv = qkv[:, Q:].view(b, 2, HKV, D)  # k and v side by side, as in the engine's qkv output
    rows = torch.cat([page * 2 * PS + offset, page * 2 * PS + PS + offset])
    flat = cache.view(-1, KV)
    kv_rows = torch.cat([k.reshape(b, KV), v.reshape(b, KV)])
    last = offset32 + 1

    def index_put():
        cache[page, :, offset] = kv

    cache8 = torch.zeros(n_pages, 2, PS, HKV, D, device=dev, dtype=FP8_KV)

    def fi_rope_write():
        flashinfer.rope.apply_rope_with_cos_sin_cache_inplace(positions, q, k, D, cos_sin,
                                                              is_neox=True)
        write(cache, k, v)

    compiled = torch.compile(rope_write, fullgraph=True, dynamic=False)
    combo = torch.compile(rope_write, fullgraph=True, dynamic=False,
                          options={"combo_kernels": True})
    return {
        "index_put": index_put,
        "index_copy": lambda: flat.index_copy_(0, rows, kv_rows),
        "append": lambda: flashinfer.append_paged_kv_cache(k, v, indptr[:b], offset32, cache,
                                                           page32, indptr, last),
        "engine": lambda: write(cache, k, v),
        "fp8 index_put": lambda: store_kv(cache8, (page, slice(None), offset), kv),
        "fp8 engine": lambda: write(cache8, k, v),
        "rope+engine": fi_rope_write,
        "compiled": lambda: compiled(qkv, positions, cos_sin, cache, page, offset),
        "compiled+combo": lambda: combo(qkv, positions, cos_sin, cache, page, offset),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", default="1,32,128")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), flush=True)
    print(f"{'B':>4} {'variant':>15} {'us/layer':>9}")
    for b in (int(v) for v in args.batch_sizes.split(",")):
        for name, fn in variants(b).items():
            try:
                us = graph_ms(lambda fn=fn: [fn() for _ in range(LAYERS)]) / LAYERS * 1e3
            except Exception as e:  # noqa: BLE001 - a variant this build refuses: say so
                print(f"{b:>4} {name:>15} failed: {type(e).__name__}: {str(e)[:160]}",
                      flush=True)
                continue
            print(f"{b:>4} {name:>15} {us:9.2f}", flush=True)


if __name__ == "__main__":
    main()

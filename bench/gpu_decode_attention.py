"""Decode attention by KV split: how fast FlashInfer's decode kernel reads the pages, per plan.

One layer of Llama-3-8B's decode attention (32 query heads, 8 KV heads x 128, page size 16), B
requests of C tokens each on shuffled pages, 32 calls (a step's layers) replayed in one CUDA
graph, GPU time per call and KV bytes read per second. Plans:
- `graph`: the wrapper the engine captures (use_cuda_graph, tensor cores, FA2; its planner
  splits the KV as it sees fit per step) - what every decode step runs today;
- `eager`: the same kernel planned without CUDA-graph mode (the eager decode wrapper of
  engine/attention/flashinfer_backend.py);
- `split N`: eager with the KV split pinned to N pages per chunk (`fixed_split_size`);
- `no split`: eager with `disable_split_kv`;
- `CUDA cores`: the decode kernel without tensor cores;
- `graph CUDA cores`: that kernel through the CUDA-graph wrapper;
- `fa3`, `graph fa3`: FlashInfer's FA3 (Hopper) kernel through the paged prefill wrapper, each
  request one query row (causal off), eager and in CUDA-graph mode (`level_args.graph_wrapper`,
  what the split cascade graph uses): whether TMA loads read decode's pages faster than FA2;
- `xqa generic`, `xqa gmma`: TensorRT-LLM's XQA decode kernel as FlashInfer ships it, through
  the engine's `XQADecode` (engine/attention/xqa_decode.py): no plan, a block table and the
  lengths on the device, the KV split reduced inside the one kernel; `gmma` is its Hopper fp8
  kernel (fp8 pages only, fp8 math), `generic` computes in bf16. Its sources are in
  FlashInfer's wheel under data/csrc/xqa; `.device/fi-xqa-src.tar.xz` adds them to the device
  kit (bench/device_run.sh).

    python -m bench.gpu_decode_attention [--cases 1x1024,32x1024,128x640,128x1024] [--fp8]
        [--plans "graph,eager,fa3,graph fa3,xqa generic"] [--page-sizes 16,64] [--layouts NHD,HND]

`--page-sizes` and `--layouts` run the FA2 plans over pages of other shapes (the engine's are
16 tokens, NHD): whether longer or head-major pages let the kernel read the KV faster.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from bench.gpu_floor import graph_ms, rel_err
from bench.gpu_fp8_attention import HKV, HQ, PS, D, pages, query

LAYERS = 32


def layers_ms(run: Callable[[], torch.Tensor]) -> float:
    """GPU ms per call of `run`, from a CUDA graph of LAYERS calls."""
    return graph_ms(lambda: [run() for _ in range(LAYERS)]) / LAYERS


def xqa_run(b: int, ctx: int, kv_dtype: torch.dtype, kernel: str) -> Callable:
    """The engine's XQA decode (engine/attention/xqa_decode.py) over the same pages."""
    from flashinfer.xqa import get_xqa_module

    from engine.attention.metadata import build_metadata
    from engine.attention.xqa_decode import SCRATCH_BYTES, SEMAPHORE_BYTES, XQADecode

    cache, indptr, indices, _, _ = pages(b, ctx, kv_dtype)
    tables = indices.view(b, -1).tolist()  # each request's pages: one run of indptr
    meta = build_metadata(tables, [ctx - 1] * b, [1] * b, PS, cache.device)
    ws = torch.zeros(SEMAPHORE_BYTES + SCRATCH_BYTES, dtype=torch.uint8, device="cuda")
    x = XQADecode(get_xqa_module, torch.bfloat16, kv_dtype, HQ, HKV, D, PS, b, len(tables[0]), 0,
                  ws, cache.device, kernel)
    x.plan(meta, b)
    q = query(b)
    return lambda: x.run(q, cache)


def fa3_run(b: int, ctx: int, kv_dtype: torch.dtype, graph: bool) -> Callable:
    """FA3 over the same pages: the paged prefill wrapper, one query row per request."""
    import flashinfer

    from engine.attention.level_args import LevelArgs, graph_wrapper

    cache, indptr, indices, last, ws = pages(b, ctx, kv_dtype)
    if graph:
        w = graph_wrapper(flashinfer, ws, b, torch.zeros_like(indices), "fa3", cache.device)
    else:
        w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", backend="fa3")
    args = LevelArgs(list(range(b + 1)), indptr.tolist(), indices, last.tolist())
    args.plan(w, HQ, HKV, D, PS, causal=False, q_data_type=torch.bfloat16,
              kv_data_type=kv_dtype, sm_scale=D ** -0.5)
    q = query(b)
    return lambda: w.run(q, cache)


def wrapper_run(b: int, ctx: int, kv_dtype: torch.dtype, plan: str, page_size: int = PS,
                layout: str = "NHD") -> Callable:
    import flashinfer

    if plan.startswith("xqa ") or plan in ("fa3", "graph fa3"):
        if (page_size, layout) != (PS, "NHD"):
            raise ValueError(f"runs only on the engine's pages ({PS} tokens, NHD)")
        if plan.startswith("xqa "):
            return xqa_run(b, ctx, kv_dtype, plan.split()[1])
        return fa3_run(b, ctx, kv_dtype, plan == "graph fa3")
    cache, indptr, indices, last, ws = pages(b, ctx, kv_dtype, page_size, layout)
    kw: dict = dict(q_data_type=torch.bfloat16, kv_data_type=kv_dtype, sm_scale=D ** -0.5)
    if plan in ("graph", "graph CUDA cores"):
        w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            ws, layout, use_cuda_graph=True, use_tensor_cores=plan == "graph", backend="fa2",
            paged_kv_indptr_buffer=torch.zeros(b + 1, dtype=torch.int32, device="cuda"),
            paged_kv_indices_buffer=torch.zeros(indices.numel(), dtype=torch.int32,
                                                device="cuda"),
            paged_kv_last_page_len_buffer=torch.ones(b, dtype=torch.int32, device="cuda"))
    else:
        w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            ws, layout, use_tensor_cores=plan != "CUDA cores", backend="fa2")
    if plan.startswith("split "):
        kw["fixed_split_size"] = int(plan.split()[1])
    elif plan == "no split":
        kw["disable_split_kv"] = True
    w.plan(indptr, indices, last, HQ, HKV, D, page_size, **kw)
    q = query(b)
    return lambda: w.run(q, cache)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="1x1024,32x1024,128x640,128x1024")
    ap.add_argument("--splits", default="4,8,16,32,64", help="fixed_split_size values, pages")
    ap.add_argument("--fp8", action="store_true", help="also float8_e4m3fn pages")
    ap.add_argument("--plans", default="", help="comma-separated plans (default: all; the "
                    "first is the reference of the error column, per page shape)")
    ap.add_argument("--page-sizes", default=str(PS),
                    help="tokens per page, comma-separated (FA2 plans; the engine's is 16)")
    ap.add_argument("--layouts", default="NHD", help="NHD (the engine's), HND, or both")
    args = ap.parse_args()
    plans = (["graph", "eager", "no split"] + [f"split {n}" for n in args.splits.split(",")]
             + ["CUDA cores", "graph CUDA cores", "fa3", "graph fa3", "xqa generic", "xqa gmma"])
    if args.plans:
        plans = args.plans.split(",")
    dtypes = [torch.bfloat16] + ([torch.float8_e4m3fn] if args.fp8 else [])
    print(torch.cuda.get_device_name(), flush=True)
    print(f"{'B':>4} {'ctx':>6} {'kv':>5} {'pages':>9} {'plan':>11} {'us/layer':>9} "
          f"{'KV TB/s':>8} {'err':>8}")
    variants = [(int(ps), lay) for ps in args.page_sizes.split(",")
                for lay in args.layouts.split(",")]
    for case in args.cases.split(","):
        b, ctx = (int(v) for v in case.split("x"))
        for kv_dtype in dtypes:
            refs: dict[str, torch.Tensor] = {}  # per page shape: each fills its pages anew
            for (ps, layout), plan in ((v, p) for v in variants for p in plans):
                pg = f"{ps} {layout}"
                try:
                    run = wrapper_run(b, ctx, kv_dtype, plan, ps, layout)
                    out = run()
                    err = rel_err(out, refs.setdefault(pg, out))
                    ms = layers_ms(run)
                except Exception as e:  # noqa: BLE001 - a plan this build refuses: say so
                    print(f"{b:>4} {ctx:>6} {'':>5} {pg:>9} {plan:>11} failed: {type(e).__name__}: "
                          f"{str(e)[:120]}", flush=True)
                    continue
                nbytes = b * ctx * 2 * HKV * D * kv_dtype.itemsize
                name = "bf16" if kv_dtype == torch.bfloat16 else "fp8"
                print(f"{b:>4} {ctx:>6} {name:>5} {pg:>9} {plan:>11} {ms * 1e3:9.1f} "
                      f"{nbytes / ms / 1e9:8.2f} {err:8.1e}", flush=True)
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

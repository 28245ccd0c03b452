"""The shared level of a cascade decode step alone: FlashInfer's FA2 prefill kernel (what the
engine runs) against its FA3 (Hopper) kernel with the shared prefix split into S slices.

G decode queries (32 heads) attend, without a mask, over one S_tokens-long shared prefix in
pages (Llama-3-8B heads 32/8 x 128, page 16, bf16), 32 layers, each over its own pool so the L2
cache does not flatter it. FlashInfer's FA3 planner does not split the KV of a request, so one
request of G queries keeps only (G x 4 / 128) x 8 CTAs busy; "fa3 xS" poses the level as S
requests that share the same G queries (the queries repeated S times), each over 1/S of the
prefix, and merges the S partial results by their LSE, pairwise in place
(`flashinfer.merge_state_in_place`), as the engine merges cascade levels. Prints ms per 32
layers (median of --repeats), TFLOP/s of the level's 4·G·Hq·S_tokens·D flops, and the largest
difference from the first variant's output.

    python -m bench.gpu_cascade_shared [--group 128] [--shared 32768] [--variants fa2:1,fa3:4,...]
"""

from __future__ import annotations

import argparse

import torch

HQ, HKV, D, PS, LAYERS = 32, 8, 128, 16, 32


def make_level(fi, workspace: torch.Tensor, backend: str, group: int, pages: int, splits: int):
    """A prefill wrapper planned for `splits` requests of `group` queries each, request s over
    pages [s·pages//splits, (s+1)·pages//splits) of 0..pages-1 (every page in one slice)."""
    w = fi.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend=backend)
    dev = workspace.device
    qo = torch.arange(0, (splits + 1) * group, group, dtype=torch.int32)
    kv = torch.tensor([pages * s // splits for s in range(splits + 1)], dtype=torch.int32)
    w.plan(qo, kv, torch.arange(pages, dtype=torch.int32, device=dev),
           torch.full((splits,), PS, dtype=torch.int32), HQ, HKV, D, PS, causal=False,
           q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
    return w


def run_level(fi, w, q: torch.Tensor, kv: torch.Tensor, splits: int):
    """[G, Hq, D] output and [G, Hq] LSE of the level."""
    if splits == 1:
        return w.run(q, kv, return_lse=True)
    g = q.shape[0]
    out, lse = w.run(q.repeat(splits, 1, 1), kv, return_lse=True)  # [S·G, Hq, D], [S·G, Hq]
    for s in range(1, splits):  # slice s into slice 0, in place (each slice is contiguous)
        fi.merge_state_in_place(out[:g], lse[:g], out[s * g:(s + 1) * g], lse[s * g:(s + 1) * g])
    return out[:g], lse[:g]


def main(argv: list[str] | None = None) -> None:
    import flashinfer as fi

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--shared", type=int, default=32768)
    ap.add_argument("--variants", default="fa2:1,fa3:1,fa3:2,fa3:4,fa3:8,fa3:16",
                    help="backend:splits, comma-separated; the first is the reference")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    pages = args.shared // PS
    pools = [torch.randn(pages, 2, PS, HKV, D, device=dev, dtype=torch.bfloat16)
             for _ in range(LAYERS)]
    q = torch.randn(args.group, HQ, D, device=dev, dtype=torch.bfloat16)
    workspace = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    tflop = 4 * args.group * HQ * args.shared * D * LAYERS / 1e12
    print(f"shared level: {args.group} queries x {args.shared} tokens, {LAYERS} layers "
          f"({tflop:.2f} TFLOP)")
    variants = [(v.split(":")[0], int(v.split(":")[1])) for v in args.variants.split(",")]
    ref = None
    for backend, splits in variants:
        try:
            w = make_level(fi, workspace, backend, args.group, pages, splits)
            out, lse = run_level(fi, w, q, pools[0], splits)
        except Exception as e:  # an unsupported variant is reported, not fatal
            print(f"  {backend} x{splits}: failed: {type(e).__name__}: {e}")
            continue
        if ref is None:
            ref = (out.float(), lse.float())
        err = (out.float() - ref[0]).abs().max().item()
        lse_err = (lse.float() - ref[1]).abs().max().item()
        times = []
        for _ in range(args.repeats):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for pool in pools:
                run_level(fi, w, q, pool, splits)
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        ms = sorted(times)[len(times) // 2]
        print(f"  {backend} x{splits}: {ms:7.2f} ms per step ({tflop / ms * 1e3:5.0f} TFLOP/s), "
              f"max |out - fa2| {err:.2e}, max |lse - fa2| {lse_err:.2e}")


if __name__ == "__main__":
    main()

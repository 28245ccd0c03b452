"""fp8 on an H100/H200: GEMM paths, accuracy and decode steps against bf16 (Llama-3-8B shape).

    python -m bench.gpu_fp8 [--parts gemm,accuracy,decode]

gemm: the 32 layers' projections (qkv 4096->6144, o 4096->4096, gate_up 4096->28672, down
  14336->4096), each layer its own weights, captured in one CUDA graph per (M, path); the GPU
  time of a replay for M = 1, 32, 128, 512. Paths: bf16 F.linear; the bare fp8 GEMMs
  (`_scaled_mm` per-tensor with unit scales, and row-wise scaled); and Fp8Linear end to end
  (per-token activation quantization included) forced onto each path, with the elementwise
  parts compiled (the default) and eager. The first M at which "layer rowwise" beats "layer
  tensor+mul" is where `engine/fp8_linear.py: ROWWISE_MIN_M` belongs. Also each projection's
  fp8-vs-bf16 relative error at M = 128 (Gaussian activations).
accuracy: Llama-3-8B shape with random weights (load_format dummy: N(0, 0.02), as Llama's init;
  no real checkpoint is reachable from the device), teacher-forced next-token distributions of
  4 x 128 positions: KL(bf16 || fp8) and top-1 agreement, for fp8 weights, fp8 KV and both.
  Random weights make these a check of the numerics, not of a trained model's quality.
decode: engine decode steps at B = 1, 32, 128 (context 1024, CUDA graphs, FlashInfer) for bf16,
  fp8 weights run one projection at a time (PDSERVE_FP8_FUSION=0), fp8 weights through the
  fused layers (engine/fp8_fusion.py), fp8 weights + fp8 KV with the pages decoded by FA2
  (PDSERVE_FP8_DECODE=fa2) and by XQA (the default): step wall time, graph replay GPU time,
  ratio to bf16.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import time

import torch
import torch.nn.functional as F

from bench.gpu_decode import StepTimer, add_requests, run_until_decoding
from bench.gpu_floor import cuda_time_ms, graph_ms, llama3_8b_dir, rel_err
from engine import fp8_linear
from engine.fp8_linear import ROWWISE_MIN_M, Fp8Linear, quantize_rows

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672),
          "down": (14336, 4096)}
LAYERS = 32
MS = (1, 32, 128, 512)
DEV = "cuda"


def _paths(xs: dict, xq: dict, bf16: dict, mods: dict) -> dict:
    """One callable per column: every projection of every layer, in one path."""
    one = torch.ones((), device=DEV)

    def gemm(rowwise: bool):
        return lambda: [torch._scaled_mm(
            xq[s][0], mod.weight.t(), scale_a=xq[s][1] if rowwise else one,
            scale_b=mod.weight_scale.view(1, -1) if rowwise else one, out_dtype=torch.bfloat16)
            for s in SHAPES for mod in mods[s]]

    def layers():
        return lambda: [mod(xs[s]) for s in SHAPES for mod in mods[s]]

    return {"bf16": lambda: [F.linear(xs[s], w) for s in SHAPES for w in bf16[s]],
            "gemm tensor": gemm(False), "gemm rowwise": gemm(True),
            # (column, ROWWISE_MIN_M, PDSERVE_FP8_COMPILE) for the Fp8Linear columns
            ("layer tensor+mul", 10**9, "1"): layers(), ("layer rowwise", 1, "1"): layers(),
            ("layer t+m eager", 10**9, "0"): layers()}


def bench_gemm() -> None:
    torch.manual_seed(0)
    bf16 = {s: [torch.randn(n, k, device=DEV, dtype=torch.bfloat16) * 0.02
                for _ in range(LAYERS)] for s, (k, n) in SHAPES.items()}
    mods = {s: [Fp8Linear.from_linear(_linear(w)) for w in ws] for s, ws in bf16.items()}
    print("\nGEMMs of 32 Llama-3-8B layers in one CUDA graph, GPU ms per replay")
    cols = ["bf16", "gemm tensor", "gemm rowwise", "layer tensor+mul", "layer rowwise",
            "layer t+m eager"]
    print(f"{'M':>5} " + " ".join(f"{c:>16}" for c in cols) + f" {'best fp8 / bf16':>16}")
    for m in MS:
        xs = {s: torch.randn(m, k, device=DEV, dtype=torch.bfloat16) for s, (k, _) in
              SHAPES.items()}
        xq = {s: quantize_rows(x) for s, x in xs.items()}
        row = {}
        for key, fn in _paths(xs, xq, bf16, mods).items():
            if isinstance(key, tuple):
                key, fp8_linear.ROWWISE_MIN_M, os.environ["PDSERVE_FP8_COMPILE"] = key
            row[key] = graph_ms(fn)
        best = min(row["layer tensor+mul"], row["layer rowwise"])
        print(f"{m:>5} " + " ".join(f"{row[c]:16.3f}" for c in cols)
              + f" {best / row['bf16']:16.2f}", flush=True)
    os.environ["PDSERVE_FP8_COMPILE"] = "1"
    fp8_linear.ROWWISE_MIN_M = ROWWISE_MIN_M
    print("\nfp8 vs bf16 GEMM, relative Frobenius error at M = 128 (bound in tests: 0.06)")
    for s, (k, _) in SHAPES.items():
        x = torch.randn(128, k, device=DEV, dtype=torch.bfloat16)
        ref, got = F.linear(x, bf16[s][0]).float(), mods[s][0](x).float()
        print(f"  {s:>8}: {rel_err(got, ref):.4f}")


def _linear(w: torch.Tensor) -> torch.nn.Linear:
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    lin.weight = torch.nn.Parameter(w, requires_grad=False)
    return lin


VARIANTS = {"bf16": {}, "fp8 weights": {"quantize": "fp8"},
            "fp8 KV": {"kv_cache_dtype": "fp8_e4m3"},
            "fp8 weights + KV": {"quantize": "fp8", "kv_cache_dtype": "fp8_e4m3"}}


def _llm(**kw):
    from engine.llm import LLM

    base = dict(load_format="dummy", dtype="bfloat16", device="cuda",
                attention_backend="flashinfer", enable_prefix_caching=False)
    return LLM(llama3_8b_dir(), **{**base, **kw})


def prompt_logits(llm, prompt: list[int]) -> torch.Tensor:
    """Teacher-forced logits [n, vocab] of one prompt, through the engine's model and attention
    backend, its KV in the pool's first pages (also tests/test_fp8.py's, on CPU)."""
    from engine.attention.metadata import build_metadata

    e = llm.engine
    ps = e.cfg.page_size
    meta = build_metadata([list(range(-(-len(prompt) // ps)))], [0], [len(prompt)], ps, e.device)
    with torch.inference_mode():
        ids = torch.tensor(prompt, device=e.device)
        hidden = e.model(ids, torch.arange(len(prompt), device=e.device), e.pool.layers,
                         e.runner.backend.plan(meta))
        return e.model.logits(hidden)


def bench_accuracy() -> None:
    rng = random.Random(0)
    prompts = [[rng.randrange(128000) for _ in range(128)] for _ in range(4)]
    ref = None
    print("\nLlama-3-8B shape, random weights (seed 0), 4 x 128 teacher-forced positions")
    print(f"{'variant':>18} {'KL mean':>9} {'KL p99':>9} {'top-1 agree':>12}")
    for name, kw in VARIANTS.items():
        llm = _llm(num_pages=64, max_model_len=1024, **kw)
        logp = torch.cat([prompt_logits(llm, p).log_softmax(-1) for p in prompts])
        del llm
        gc.collect()
        torch.cuda.empty_cache()
        if ref is None:
            ref = logp
            continue
        kl = (ref.exp() * (ref - logp)).sum(-1)
        agree = (ref.argmax(-1) == logp.argmax(-1)).float().mean().item()
        print(f"{name:>18} {kl.mean().item():9.5f} {kl.quantile(0.99).item():9.5f} "
              f"{agree:12.3f}", flush=True)


def bench_decode(sizes: list[int], context: int, steps: int) -> None:
    max_len = context + 4 * steps + 64
    num_pages = max(sizes) * -(-max_len // 16) + 64
    rows: dict[str, dict[int, tuple[float, float]]] = {}
    # "unfused": fp8 layers one projection at a time (PDSERVE_FP8_FUSION=0), the path before
    # engine/fp8_fusion.py; "KV, FA2": fp8 pages decoded by FlashInfer's FA2 kernel instead of
    # XQA (PDSERVE_FP8_DECODE=fa2); each measured in the same run
    both = VARIANTS["fp8 weights + KV"]
    for name, kw, env in (("bf16", {}, {}),
                          ("fp8 weights, unfused", VARIANTS["fp8 weights"],
                           {"PDSERVE_FP8_FUSION": "0"}),
                          ("fp8 weights", VARIANTS["fp8 weights"], {}),
                          ("fp8 weights + KV, FA2", both, {"PDSERVE_FP8_DECODE": "fa2"}),
                          ("fp8 weights + KV", both, {})):
        os.environ.update({"PDSERVE_FP8_FUSION": "1", "PDSERVE_FP8_DECODE": "gmma", **env})
        t0 = time.perf_counter()
        llm = _llm(cuda_graphs=True, max_num_seqs=max(sizes), max_num_batched_tokens=16384,
                   max_model_len=max_len, num_pages=num_pages, **kw)
        print(f"{name}: engine ready in {time.perf_counter() - t0:.0f} s", flush=True)
        engine, rng = llm.engine, random.Random(0)
        timer = StepTimer(engine)
        rows[name] = {}
        for b in sizes:
            prompts = [[rng.randrange(128000) for _ in range(context)] for _ in range(b)]
            rids = add_requests(engine, prompts, max_tokens=4 * steps + 16)
            run_until_decoding(engine, rids)
            step_s = timer.steps(steps)[0]
            graphs = engine.runner.graphs
            gpu_ms = cuda_time_ms(graphs.graphs[graphs.bucket(b)].replay, reps=20)
            rows[name][b] = (step_s * 1e3, gpu_ms)
            for rid in rids:
                engine.abort(rid)
        del llm, engine, timer
        gc.collect()
        torch.cuda.empty_cache()
    print(f"\nLlama-3-8B decode step, context {context}, CUDA graphs, FlashInfer "
          "(step ms wall / graph GPU ms; x = ratio to bf16)")
    print(f"{'B':>4} " + " ".join(f"{n:>30}" for n in rows))
    for b in sizes:
        base = rows["bf16"][b]
        cells = [f"{s:7.2f} / {g:6.2f} ({s / base[0]:.2f}x/{g / base[1]:.2f}x)"
                 for s, g in (rows[n][b] for n in rows)]
        print(f"{b:>4} " + " ".join(f"{c:>30}" for c in cells), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="gemm,accuracy,decode")
    ap.add_argument("--batch-sizes", default="1,32,128")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    parts = args.parts.split(",")
    print(torch.cuda.get_device_name(), f"torch {torch.__version__}", flush=True)
    if "gemm" in parts:
        bench_gemm()
        gc.collect()
        torch.cuda.empty_cache()
    if "accuracy" in parts:
        bench_accuracy()
    if "decode" in parts:
        bench_decode([int(b) for b in args.batch_sizes.split(",")], args.context, args.steps)


if __name__ == "__main__":
    main()

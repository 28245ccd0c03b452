"""Prefill throughput of Llama-3-8B (bf16, dummy weights) as a share of the bf16 matmul rate.

Each case is one engine step that prefills whole prompts from scratch (no prefix-cache hits)
and samples their first tokens; its matmul flops (bench/gpu_floor.prefill_flops) over the step's
wall time, divided by the matmul rate measured in this run, is the share (target >= 70%).

    python -m bench.gpu_prefill --cases 1x4096,8x1024 [--quantize fp8] [--profile]

With --quantize fp8 the share is still of the bf16 matmul rate (fp8 tensor cores may pass 100%).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from bench.gpu_decode import print_kernel_profile
from bench.gpu_floor import emit_row, llama3_8b_dir, measure_floor, prefill_flops
from engine.llm import LLM
from engine.sampling_params import SamplingParams


def add_prompts(engine, num: int, length: int, rng: random.Random) -> None:
    """`num` random prompts of `length` tokens, each to sample one greedy token."""
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    for _ in range(num):
        engine.add_request([rng.randrange(engine.arch.vocab_size) for _ in range(length)],
                           params)


def bench_case(engine, num: int, length: int, reps: int, rng: random.Random) -> dict:
    times = []
    for i in range(reps + 1):
        add_prompts(engine, num, length, rng)
        t0 = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - t0
        assert len(outs) == num and all(o.finished for o in outs), "not one prefill step"
        if i:  # the first round warms this shape up
            times.append(dt)
    step_s = statistics.median(times)
    flops = prefill_flops(engine.arch, [length] * num)
    return {"case": f"{num}x{length}", "step_ms": step_s * 1e3, "tflops": flops / step_s / 1e12}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="1x4096,8x1024")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", help="append JSON lines here")
    ap.add_argument("--quantize", choices=["fp8"], help="fp8 weights (docs/fp8.md)")
    ap.add_argument("--profile", action="store_true",
                    help="after the timings, print each case's top kernels per step")
    args = ap.parse_args()
    cases = [tuple(int(x) for x in c.split("x")) for c in args.cases.split(",")]
    floor = measure_floor()
    print(floor, flush=True)
    budget = max(n * t for n, t in cases)
    llm = LLM(llama3_8b_dir(), load_format="dummy", dtype="bfloat16", device="cuda",
              attention_backend="flashinfer", quantize=args.quantize,
              max_num_seqs=max(n for n, _ in cases),
              max_num_batched_tokens=budget, max_model_len=max(t for _, t in cases) + 64,
              num_pages=budget // 16 + 256, enable_prefix_caching=False,
              # one step timed from launch to its tokens: nothing to overlap it with
              overlap_scheduling="off")
    rng = random.Random(0)
    rows = []
    for num, length in cases:
        row = bench_case(llm.engine, num, length, args.reps, rng)
        row.update(device=floor.device, matmul_tflops=floor.matmul_flops_per_s / 1e12,
                   share=row["tflops"] * 1e12 / floor.matmul_flops_per_s)
        rows.append(row)
        emit_row(row, "prefill", args.out)
    if args.profile:  # after every timing: the profiler slows eager launches down for good
        for num, length in cases:
            def step(num=num, length=length) -> None:
                add_prompts(llm.engine, num, length, rng)
                llm.engine.step()
            print_kernel_profile(step, f"{num}x{length} prefill step", reps=3)
    print(f"\nLlama-3-8B prefill, bf16, weights {args.quantize or 'bf16'}, {floor}")
    print(f"{'case':>8} {'step ms':>8} {'TFLOP/s':>8} {'share of matmul':>16}")
    for r in rows:
        print(f"{r['case']:>8} {r['step_ms']:8.1f} {r['tflops']:8.0f} {r['share']:16.1%}")


if __name__ == "__main__":
    main()

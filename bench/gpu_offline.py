"""The Serve benchmark's workload through the engine alone (no Ray, no HTTP), and its roofline.

`num-prompts` requests of `input-len` random token ids, `output-len` tokens each, at most
`concurrency` in flight (a closed loop, as `bench.serve` runs it). It separates what the engine
does from what the serving path adds, and prints the workload's time bounds from the hardware
measured in the same run:
- compute bound: all prefill and decode flops at the measured bf16 matmul rate;
- serial bound: prefill flops at that rate plus, for every decode step of a full batch, its
  weight and KV bytes at the copy bandwidth (prefill and decode not overlapped).

    python -m bench.gpu_offline [--budgets 2048,8192] [--concurrency 128] [--overlap on,off]
"""

from __future__ import annotations

import argparse
import random
import time

from bench.gpu_floor import decode_bytes, linear_params, llama3_8b_dir, measure_floor, prefill_flops
from bench.gpu_serve import step_fill
from engine.llm import LLM
from engine.sampling_params import SamplingParams


def run(llm: LLM, prompts: list[list[int]], output_len: int, concurrency: int) -> dict:
    engine = llm.engine
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    pending, live = list(prompts), 0
    steps = decode_steps = 0
    decode_s = tokens = 0.0
    sched = engine.scheduler
    before = (sched.num_prefill_tokens, sched.num_prefill_steps, sched.num_decode_tokens)
    start = time.perf_counter()
    while pending or engine.has_unfinished():
        while pending and live < concurrency:
            engine.add_request(pending.pop(), params)
            live += 1
        decode_only = not engine.scheduler.waiting and all(
            r.num_computed_tokens >= r.num_prompt_tokens for r in engine.scheduler.running)
        t = time.perf_counter()
        outs = engine.step()
        if decode_only:
            decode_steps += 1
            decode_s += time.perf_counter() - t
        steps += 1
        for out in outs:
            tokens += len(out.new_token_ids)
            live -= out.finished
    wall = time.perf_counter() - start
    fill = step_fill(steps, sched.num_prefill_tokens - before[0],
                     sched.num_prefill_steps - before[1], sched.num_decode_tokens - before[2])
    return {"tok_s": tokens / wall, "wall_s": wall, "steps": steps, "decode_steps": decode_steps,
            "decode_step_ms": 1e3 * decode_s / max(decode_steps, 1), "fill": fill}


def bounds(arch, floor, n: int, input_len: int, output_len: int, concurrency: int) -> dict:
    waves = -(-n // concurrency)
    pf = prefill_flops(arch, [input_len] * n)
    df = 2 * linear_params(arch) * n * (output_len - 1)
    mem = 0.0
    for step in range(output_len - 1):  # each wave: a full batch at growing contexts
        w, kv = decode_bytes(arch, [input_len + step + 1] * concurrency)
        mem += waves * (w + kv) / floor.copy_bytes_per_s
    tokens = n * output_len
    return {"compute_tok_s": tokens / ((pf + df) / floor.matmul_flops_per_s),
            "serial_tok_s": tokens / (pf / floor.matmul_flops_per_s + mem)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--concurrency", type=int, default=128)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--budgets", default="2048,8192", help="max_num_batched_tokens to try")
    ap.add_argument("--quantize", choices=["fp8"], help="fp8 weights (docs/fp8.md)")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8_e4m3"])
    ap.add_argument("--overlap", default="on,off", help="overlap_scheduling settings to try")
    args = ap.parse_args()
    floor = measure_floor()
    print(floor, flush=True)
    rng = random.Random(0)
    prompts = [[rng.randrange(10, 1000) for _ in range(args.input_len)]
               for _ in range(args.num_prompts)]
    runs = [(int(b), o) for b in args.budgets.split(",") for o in args.overlap.split(",")]
    for budget, overlap in runs:
        llm = LLM(llama3_8b_dir(), load_format="dummy", dtype="bfloat16", device="cuda",
                  attention_backend="flashinfer", cuda_graphs=True, max_num_seqs=256,
                  max_num_batched_tokens=budget, max_model_len=8192, num_pages=14336,
                  quantize=args.quantize, kv_cache_dtype=args.kv_cache_dtype,
                  overlap_scheduling=overlap)
        run(llm, prompts[:16], args.output_len, 16)  # warm-up
        res = run(llm, prompts, args.output_len, args.concurrency)
        b = bounds(llm.engine.arch, floor, args.num_prompts, args.input_len,
                   args.output_len, args.concurrency)
        print(f"budget {budget}, overlap {overlap}: {res['tok_s']:.0f} output tok/s "
              f"({res['wall_s']:.2f} s, "
              f"{res['steps']} steps, {res['decode_steps']} decode-only at "
              f"{res['decode_step_ms']:.1f} ms; {res['fill']}); "
              f"bounds: serial {b['serial_tok_s']:.0f}, "
              f"compute {b['compute_tok_s']:.0f} tok/s; engine / serial bound "
              f"{res['tok_s'] / b['serial_tok_s']:.2f}", flush=True)
        del llm


if __name__ == "__main__":
    main()

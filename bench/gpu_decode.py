"""Decode step time of Llama-3-8B (bf16, dummy weights) against the memory-bandwidth floor.

The floor of a decode step is (weight bytes + KV bytes read) / copy bandwidth, both measured in
this run (bench/gpu_floor.py). The engine is driven as in serving: B requests with C-token
prompts are prefilled, then each timed `engine.step()` decodes one token for all of them.

Reported per batch size: the engine step (scheduler + runner + sampling, wall clock, with
overlapped scheduling as configured: on by default on CUDA), the runner's launch alone (host
time to queue a step; with overlap off it includes waiting for the tokens), and the GPU time of
the captured graph replay (CUDA events); then the same step without overlap ("serial"), without
CUDA graphs, and without graphs and fused kernels (plain PyTorch around attention).

    python -m bench.gpu_decode --batch-sizes 1,32,128 --context 1024
    python -m bench.gpu_decode --quantize fp8 --kv-cache-dtype fp8_e4m3   (docs/fp8.md)

With fp8 the floor counts 1 byte per linear weight (--quantize) and per KV element.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

import engine.model as model_module
from bench.gpu_floor import (
    cuda_time_ms,
    decode_bytes,
    emit_row,
    linear_params,
    llama3_8b_dir,
    measure_floor,
)
from engine import gemv
from engine.llm import LLM
from engine.sampling_params import SamplingParams


def add_requests(engine, prompts: list[list[int]], max_tokens: int) -> list[str]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return [engine.add_request(p, params) for p in prompts]


def run_until_decoding(engine, rids: list[str]) -> None:
    """Step until every request has its first token (its prompt is in the KV cache)."""
    while any(not engine.scheduler.requests[r].output_token_ids for r in rids):
        engine.step()


class StepTimer:
    """Wall-clock times of engine steps and of the runner's launches inside them."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.runner_s: list[float] = []
        self._launch = engine.runner.launch

        def timed(batch):
            t0 = time.perf_counter()
            out = self._launch(batch)
            if not engine.overlap:
                out.result()  # serial: the runner's time includes waiting for the tokens
            self.runner_s.append(time.perf_counter() - t0)
            return out

        engine.runner.launch = timed

    def steps(self, n: int, warmup: int = 2) -> tuple[float, float, int]:
        """Median step and runner seconds over n steps; total KV tokens per step (mean)."""
        for _ in range(warmup):
            self.engine.step()
        self.runner_s.clear()
        step_s, kv = [], []
        for _ in range(n):
            kv.append(sum(r.num_tokens for r in self.engine.scheduler.running))
            t0 = time.perf_counter()
            self.engine.step()
            step_s.append(time.perf_counter() - t0)
        return statistics.median(step_s), statistics.median(self.runner_s), sum(kv) // n


def print_kernel_profile(fn, title: str, reps: int = 5) -> None:
    """Where the GPU time goes: the top kernels of `reps` calls of fn, by total device time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    total = sum(e.self_device_time_total for e in events) / reps
    launches = sum(e.count for e in events) / reps
    print(f"\n{title}: {total / 1e3:.3f} ms of kernels per call, {launches:.0f} kernels (and "
          f"copies) per call; top kernels (us per call):")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:20]:
        print(f"  {e.self_device_time_total / reps:9.1f}  x{e.count // reps:<4} {e.key[:150]}")


def bench_batch(engine, timer: StepTimer, batch: int, context: int, steps: int, floor,
                rng: random.Random, profile: bool = False, host_profile: bool = False,
                fp8_weights: bool = False, fp8_kv: bool = False) -> dict:
    arch = engine.arch
    prompts = [[rng.randrange(arch.vocab_size) for _ in range(context)] for _ in range(batch)]
    rids = add_requests(engine, prompts, max_tokens=4 * steps + 16)
    run_until_decoding(engine, rids)
    runner = engine.runner
    row = {"batch": batch, "context": context}
    step_s, runner_s, kv_tokens = timer.steps(steps)
    weights, kv = decode_bytes(arch, [kv_tokens // batch] * batch)
    if fp8_weights:
        weights -= linear_params(arch)  # 1 byte per linear weight instead of 2
    if fp8_kv:
        kv //= 2
    floor_s = (weights + kv) / floor.copy_bytes_per_s
    row.update(floor_ms=floor_s * 1e3, weight_gb=weights / 1e9, kv_gb=kv / 1e9,
               step_ms=step_s * 1e3, runner_ms=runner_s * 1e3)
    if profile and runner.graphs is not None:
        # Only after every timing of the run: once torch.profiler has run, eager launches in
        # this process stay slower.
        engine.step()
        b = runner.graphs.bucket(batch)
        print_kernel_profile(runner.graphs.graphs[b].replay, f"B={batch} graph replay")
        for rid in rids:
            engine.abort(rid)
        return {}
    if host_profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        for _ in range(5):
            engine.step()
        prof.disable()
        print(f"\nB={batch}: host-side profile of 5 engine steps (CUDA graphs on)")
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)
    if engine.overlap:
        engine.overlap = False
        row["serial_step_ms"] = timer.steps(steps)[0] * 1e3
        engine.overlap = True
    if runner.graphs is not None:
        # Replays of the step just planned: the forward's GPU time alone (no host work).
        b = runner.graphs.bucket(batch)
        row["graph_gpu_ms"] = cuda_time_ms(runner.graphs.graphs[b].replay, reps=20)
        graphs, runner.graphs = runner.graphs, None
        row["eager_step_ms"] = timer.steps(steps)[0] * 1e3
        fused = model_module.fused_kernels
        model_module.fused_kernels = lambda x: None
        row["plain_step_ms"] = timer.steps(max(3, steps // 2))[0] * 1e3
        model_module.fused_kernels = fused
        runner.graphs = graphs
    for rid in rids:
        engine.abort(rid)
    for key in ("step_ms", "runner_ms", "serial_step_ms", "graph_gpu_ms", "eager_step_ms",
                "plain_step_ms"):
        if key in row:
            row[key.replace("_ms", "_x_floor")] = row[key] / row["floor_ms"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", default="1,32,128")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--no-cuda-graphs", action="store_true")
    ap.add_argument("--profile", action="store_true", help="print the top kernels per step")
    ap.add_argument("--host-profile", action="store_true",
                    help="cProfile the host side of a few steps at the largest batch")
    ap.add_argument("--out", help="append JSON lines here")
    ap.add_argument("--quantize", choices=["fp8"], help="fp8 weights (quantized at load)")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8_e4m3"])
    args = ap.parse_args()
    fp8 = dict(fp8_weights=args.quantize == "fp8", fp8_kv=args.kv_cache_dtype == "fp8_e4m3")
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    floor = measure_floor()
    print(floor, flush=True)
    max_len = args.context + 4 * args.steps + 64
    num_pages = max(sizes) * -(-max_len // 16) + 64
    t0 = time.perf_counter()
    llm = LLM(llama3_8b_dir(), load_format="dummy", dtype="bfloat16", device="cuda",
              attention_backend="flashinfer", cuda_graphs=not args.no_cuda_graphs,
              max_num_seqs=max(sizes), max_num_batched_tokens=16384, max_model_len=max_len,
              num_pages=num_pages, enable_prefix_caching=False, quantize=args.quantize,
              kv_cache_dtype=args.kv_cache_dtype)
    print(f"engine ready in {time.perf_counter() - t0:.1f} s", flush=True)
    for line in gemv.report():  # the one-row projections' timing (engine/gemv.py)
        print(f"gemv {line}", flush=True)
    engine = llm.engine
    timer = StepTimer(engine)
    rng = random.Random(0)
    rows = []
    for b in sizes:
        host = args.host_profile and b == max(sizes)
        row = bench_batch(engine, timer, b, args.context, args.steps, floor, rng,
                          host_profile=host, **fp8)
        row["device"] = floor.device
        rows.append(row)
        emit_row(row, "decode", args.out)
    if args.profile:
        for b in sizes:
            bench_batch(engine, timer, b, args.context, 1, floor, rng, profile=True, **fp8)
    kind = f"bf16, weights {args.quantize or 'bf16'}, KV {args.kv_cache_dtype}"
    print(f"\nLlama-3-8B decode, context {args.context}, {kind}, {floor}")
    print("(x floor columns: step / floor; launch = host time the runner takes to queue a step)")
    print(f"{'B':>4} {'floor ms':>9} {'step ms':>8} {'x floor':>8} {'launch':>7} {'serial':>7}"
          f" {'graph GPU':>10} {'eager':>7} {'plain':>7}")
    for r in rows:
        print(f"{r['batch']:>4} {r['floor_ms']:9.2f} {r['step_ms']:8.2f} {r['step_x_floor']:8.3f}"
              f" {r['runner_x_floor']:7.3f} {r.get('serial_step_x_floor', float('nan')):7.3f}"
              f" {r.get('graph_gpu_x_floor', float('nan')):10.3f}"
              f" {r.get('eager_step_x_floor', float('nan')):7.3f}"
              f" {r.get('plain_step_x_floor', float('nan')):7.3f}")


if __name__ == "__main__":
    main()

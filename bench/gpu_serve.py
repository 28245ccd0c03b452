"""Through Ray Serve on one GPU: N concurrent requests against HF transformers `generate`.

    python -m bench.gpu_serve [--concurrency 128] [--input-len 512] [--output-len 128]

1. makes the Llama-3-8B-shaped model directory (config.json + the tiny model's tokenizer files,
   so the API can run; prompts are token ids below the tokenizer's size);
2. times HF `generate` on the same GPU: one batch of `concurrency` random prompts, bf16,
   random weights, exactly `output-len` new tokens (the baseline);
3. starts `serve run configs/llama3-8b-gpu.yaml` (FlashInfer, CUDA graphs, 1P + 1D sharing the
   GPU) and runs bench.serve at that concurrency; prints tokens/s of both and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from bench.gpu_floor import LLAMA3_8B


def make_model_dir(path: Path) -> Path:
    from engine.tiny_model import ensure_tiny_model

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(LLAMA3_8B, indent=2))
    tiny = ensure_tiny_model()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny / name).exists():
            shutil.copy(tiny / name, path / name)
    return path


def hf_baseline(path: Path, batch: int, input_len: int, output_len: int) -> float:
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    cfg = AutoConfig.from_pretrained(path)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    gen = GenerationConfig(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    ids = torch.randint(10, 1000, (batch, input_len), device="cuda")
    mask = torch.ones_like(ids)
    with torch.no_grad():
        model.generate(ids[:, :16], attention_mask=mask[:, :16], max_new_tokens=4)  # warm-up
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, generation_config=gen)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
    tokens = (out.shape[1] - input_len) * batch
    del model, out
    torch.cuda.empty_cache()
    return tokens / dt


STEP_COUNTERS = ("pdserve_engine_steps_total", "pdserve_engine_step_seconds_total",
                 "pdserve_engine_round_seconds_total", "pdserve_engine_action_seconds_total",
                 "pdserve_engine_device_seconds_total")
SCHEDULED = ("pdserve_scheduled_prefill_tokens_total", "pdserve_scheduled_prefill_steps_total",
             "pdserve_scheduled_decode_tokens_total")
HOLDS = ("pdserve_engine_decode_holds_total", "pdserve_engine_decode_hold_seconds_total")
KV_BYTES = "pdserve_kv_transfer_bytes_total"  # received by decode replicas (fp8 KV: half)
KV_MAPS = "pdserve_kv_transfer_maps_total"  # cuda_ipc: sender allocations mapped (a total)
KV_UNMAPS = ("pdserve_kv_transfer_unmaps_total", "pdserve_kv_transfer_unmap_seconds_total")
METRICS_PUSH_S = 3.0


def step_counters() -> dict[str, dict]:
    """The serving replicas' step-thread counters from /metrics, per metric and replica."""
    import httpx

    from bench.soak import parse_metrics

    text = httpx.get("http://127.0.0.1:8000/metrics", timeout=30).text
    return {name: parse_metrics(text, name)
            for name in (*STEP_COUNTERS, *SCHEDULED, *HOLDS, KV_BYTES, KV_MAPS, *KV_UNMAPS)}


def run_total(before: dict[str, dict], after: dict[str, dict], name: str) -> float:
    """How much counter `name` grew over the run, summed over the replicas."""
    return sum(growth(before, after, name).values())


def print_step_times(before: dict[str, dict], after: dict[str, dict]) -> None:
    """Per serving replica, over the run: steps, mean time in `Engine.step`, the mean host
    time the serving path added between two steps (the rest of the step thread's rounds), the
    device's mean time in a step (the GPU sat idle for the rest of a round), how full the
    steps were (`step_fill`), and the decode holds (engine/decode_hold.py) where there were any."""
    steps, step_s, round_s, action_s, device_s, prefill, prefill_steps, decode = (
        growth(before, after, name) for name in (*STEP_COUNTERS, *SCHEDULED))
    for key, n in sorted(steps.items()):
        if n:
            print(f"step thread {key[0]} {key[1][:8]}: {n:.0f} steps, "
                  f"{1e3 * step_s[key] / n:.2f} ms in Engine.step, "
                  f"{1e3 * (round_s[key] - step_s[key]) / n:.2f} ms between steps "
                  f"(actions {1e3 * action_s.get(key, 0.0) / n:.2f} ms), "
                  f"{1e3 * device_s.get(key, 0.0) / n:.2f} ms on the device; "
                  + step_fill(n, prefill.get(key, 0.0), prefill_steps.get(key, 0.0),
                              decode.get(key, 0.0)) + holds(before, after, key), flush=True)


def growth(before: dict[str, dict], after: dict[str, dict], name: str) -> dict:
    """How much counter `name` grew over the run, per replica (none where /metrics lacked it)."""
    return {k: v - before.get(name, {}).get(k, 0.0) for k, v in after.get(name, {}).items()}


def holds(before: dict[str, dict], after: dict[str, dict], key: tuple) -> str:
    """"; N decode holds, S s held" for a replica that held its decode steps over the run."""
    n, held_s = (growth(before, after, name).get(key, 0.0) for name in HOLDS)
    return f"; {n:.0f} decode holds, {held_s:.3f} s held" if n else ""


def step_fill(steps: float, prefill: float, prefill_steps: float, decode: float) -> str:
    """Prompt tokens per step that ran any, and decode rows per step (the scheduler's counters)."""
    return (f"{prefill_steps:.0f} steps with prompt tokens ({prefill / max(prefill_steps, 1):.0f} "
            f"each), {decode / steps:.1f} decode rows per step")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="configs/llama3-8b-gpu.yaml")
    ap.add_argument("--concurrency", type=int, default=128)
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--out-dir", default=os.environ.get("OUT", tempfile.mkdtemp()))
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--client-processes", type=int, default=1,
                    help="client processes sending the measured run (bench.serve)")
    ap.add_argument("--make-model-only", action="store_true")
    args = ap.parse_args(argv)
    path = make_model_dir(Path("~/.cache/pdserve/models/llama3-8b-shape").expanduser())
    if args.make_model_only:
        print(path)
        return
    hf_tps = None
    if not args.skip_hf:
        hf_tps = hf_baseline(path, args.concurrency, args.input_len, args.output_len)
        print(f"HF generate, batch {args.concurrency}: {hf_tps:.1f} tok/s", flush=True)

    from bench import serve as bench_serve
    from bench.launcher import ServerProcess, expand

    out = Path(args.out_dir)
    server = ServerProcess(expand("{serve} run {config}", args.config),
                           "http://127.0.0.1:8000/health", out / "serve.log")
    server.start()
    try:
        ready = server.wait_ready(timeout=480)
        print(f"serve ready after {ready:.0f} s", flush=True)
        common = ["--base-url", "http://127.0.0.1:8000", "--workload", "synthetic",
                  "--input-len", str(args.input_len), "--output-len", str(args.output_len),
                  "--request-rate", "inf", "--no-progress", "--vocab-size", "1000",
                  # Random weights' tokens decode to no text, and the API sends no empty chunk
                  # unless it carries a logprob: ask for one so every token is timed.
                  "--count-empty-chunks", "--extra-body", '{"logprobs": 0}']
        bench_serve.main(common + ["--num-prompts", "16", "--concurrency", "16", "--seed", "1",
                                   "--out", str(out / "warmup.json")])
        res_path = out / "serve.json"
        before = step_counters()
        bench_serve.main(common + ["--num-prompts", str(args.num_prompts), "--concurrency",
                                   str(args.concurrency), "--seed", "0", "--out", str(res_path),
                                   "--client-processes", str(args.client_processes)])
        run = json.loads(res_path.read_text())["runs"][0]
        time.sleep(METRICS_PUSH_S)  # the replicas' last counters reach /metrics
        after = step_counters()
        print_step_times(before, after)
        kv_bytes = run_total(before, after, KV_BYTES)
        print(f"KV transferred: {kv_bytes / args.num_prompts / 2**20:.2f} MiB per request "
              f"({KV_BYTES})", flush=True)
        if after[KV_MAPS]:  # cuda_ipc
            maps = run_total(before, after, KV_MAPS)
            unmaps, unmap_s = (run_total(before, after, n) for n in KV_UNMAPS)
            print(f"KV sender allocations mapped: {maps:.0f} for {args.num_prompts} requests "
                  f"({KV_MAPS}); unmapped during the run: {unmaps:.0f}, in "
                  f"{1e3 * unmap_s:.1f} ms", flush=True)
    finally:
        server.stop()
    if not run["completed"]:
        raise SystemExit(f"no request completed: {run['errors']}")
    tps = run["output_throughput"]
    print(f"\npdserve ({args.config}), concurrency {args.concurrency}: {tps:.1f} tok/s "
          f"(TTFT p50 {run['ttft_ms']['p50']:.0f} / p99 {run['ttft_ms']['p99']:.0f} ms, "
          f"TPOT p50 {run['tpot_ms']['p50']:.1f} / p99 {run['tpot_ms']['p99']:.1f} ms, "
          f"ITL p50 {run['itl_ms']['p50']:.1f} / p99 {run['itl_ms']['p99']:.1f} ms; client CPU "
          f"{100 * run['client_cpu_s'] / run['duration_s']:.0f}% of a core in "
          f"{args.client_processes} process(es))")
    if hf_tps:
        print(f"HF generate, batch {args.concurrency}: {hf_tps:.1f} tok/s -> ratio "
              f"{tps / hf_tps:.1f}x")


if __name__ == "__main__":
    main()

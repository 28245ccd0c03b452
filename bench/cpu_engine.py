"""LLM.generate throughput on CPU vs HF transformers `generate` one prompt at a time.

python -m bench.cpu_engine [--model DIR] [--prompts 32] [--prompt-len 64] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import random
import time

import torch


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--hf-prompts", type=int, default=8, help="HF is timed on this many prompts")
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM, GenerationConfig

    from engine.config import default_model_dir
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams
    from engine.tiny_model import ensure_tiny_model

    path = args.model or str(ensure_tiny_model(default_model_dir()))
    rng = random.Random(0)
    prompts = [[rng.randrange(6, 1900) for _ in range(args.prompt_len)]
               for _ in range(args.prompts)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    llm = LLM(path, num_pages=4096)
    llm.generate(prompts[:2], params)  # warm-up
    llm.engine.scheduler.kv.reset_prefix_cache()
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    engine_s = time.perf_counter() - t
    engine_tps = sum(len(o.token_ids) for o in outs) / engine_s

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    cfg = GenerationConfig(max_new_tokens=args.max_tokens, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    with torch.no_grad():
        hf.generate(torch.tensor([prompts[0]]), generation_config=cfg)  # warm-up
        t = time.perf_counter()
        for p in prompts[:args.hf_prompts]:
            hf.generate(torch.tensor([p]), generation_config=cfg)
        hf_s = time.perf_counter() - t
    hf_tps = args.hf_prompts * args.max_tokens / hf_s
    print(f"threads={torch.get_num_threads()} prompts={args.prompts} "
          f"prompt_len={args.prompt_len} max_tokens={args.max_tokens}")
    print(f"LLM.generate (batched):      {engine_tps:8.1f} tok/s  ({engine_s:.2f} s)")
    print(f"HF generate (one at a time): {hf_tps:8.1f} tok/s  ({args.hf_prompts} prompts)")
    print(f"ratio: {engine_tps / hf_tps:.2f}x")


if __name__ == "__main__":
    main()

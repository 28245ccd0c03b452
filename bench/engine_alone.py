"""A config's serving engine alone, in this process: the bound of bench.cpu_cluster's 32 / 1 ratio.

python -m bench.engine_alone [--config configs/tiny.yaml] [--threads 1]

The engine is the serving role's (decode, or colocated) as the config builds it, on as many
torch threads as its replica gets: Ray sets `OMP_NUM_THREADS=1` in an actor given no CPUs, which
every replica of the CPU configs is. It runs bench.cpu_cluster's workload without Serve:
`--single` prompts one at a time, then `--waves` waves of `--concurrency` prompts, each prompt
`--input-len` random token ids with `--output-len` tokens out (greedy, EOS ignored). Tokens/s
counts output tokens over the wall time of generate calls, prefill included, as the Serve
benchmark's clock does.
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from engine.llm import LLM


@dataclass(frozen=True)
class Run:
    prompts: int
    output_tokens: int
    seconds: float

    @property
    def tok_s(self) -> float:
        return self.output_tokens / self.seconds


def build_llm(config: str | Path) -> LLM:
    """The LLM of `config`'s first application, with its serving role's engine settings."""
    from engine.llm import LLM
    from engine.tiny_model import ensure_tiny_model
    from serving.config import AppConfig

    args = yaml.safe_load(Path(config).read_text())["applications"][0]["args"]
    cfg = AppConfig.from_args(args)
    if cfg.model.path is None:
        ensure_tiny_model(cfg.model.resolved_path)  # as `serve run` does on first start
    model = asdict(cfg.model.to_config())
    return LLM(model.pop("path"), **model, **asdict(cfg.engine_config(cfg.serving_role)))


def measure(llm: LLM, input_len: int, output_len: int, single: int, concurrency: int, waves: int,
            vocab_size: int = 1000, seed: int = 0) -> tuple[Run, Run]:
    """(one prompt at a time, `waves` x `concurrency` at a time); the prefix cache is emptied
    first, and the prompts are distinct, so every prompt is prefilled."""
    from engine.sampling_params import SamplingParams

    rng = random.Random(seed)
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)

    def prompts(n: int) -> list[list[int]]:
        return [[rng.randrange(vocab_size) for _ in range(input_len)] for _ in range(n)]

    llm.generate(prompts(2), params)  # warm-up
    llm.engine.scheduler.kv.reset_prefix_cache()

    def run(batches: list[list[list[int]]]) -> Run:
        tokens, t = 0, time.perf_counter()
        for batch in batches:
            tokens += sum(len(c.token_ids) for c in llm.generate(batch, params))
        return Run(sum(map(len, batches)), tokens, time.perf_counter() - t)

    one = run([[p] for p in prompts(single)])
    many = run([prompts(concurrency) for _ in range(waves)])
    return one, many


def main(argv: list[str] | None = None) -> tuple[Run, Run]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a replica's)")
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--single", type=int, default=8, help="prompts run one at a time")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--waves", type=int, default=2)
    args = ap.parse_args(argv)

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        one, many = measure(build_llm(args.config), args.input_len, args.output_len,
                            args.single, args.concurrency, args.waves)
    finally:
        torch.set_num_threads(threads)
    print(f"engine alone ({args.config}, {args.threads} torch thread(s)): 1 at a time "
          f"{one.tok_s:.1f} tok/s, {args.concurrency} at a time {many.tok_s:.1f} tok/s: "
          f"{many.tok_s / one.tok_s:.2f}x")
    return one, many


if __name__ == "__main__":
    main()

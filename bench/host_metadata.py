"""Host (CPU) time of one step's attention planning: block-table sync, cascade plan, metadata.

    python -m bench.host_metadata [--reps 50]

The GPU waits while the runner does this work, so it adds to every step. Three shapes:
- cascade: 128 decode requests sharing a 32K-token prefix (2048 shared pages + 17 own each,
  page size 16), with the cascade plan (mode "auto" takes it at this size);
- plain: 128 decode requests x 64 pages, no cascade;
- prefill: one chunk of 8192 new tokens.
Times are medians in ms, on CPU tensors (the device copy is not timed). `sync` is the runner's
steady state (the mirror already holds the tables, nothing new to copy); `first sync` copies
every table from scratch, as on a request's first step or after a preemption.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from engine.attention.cascade import plan_cascade
from engine.attention.metadata import build_metadata
from engine.block_table import BlockTableMirror
from engine.request import Request
from engine.sampling_params import SamplingParams

PS = 16


def median_ms(fn: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def make_requests(tables: list[list[int]], kv_lens: list[int], num_new: list[int]) -> list:
    reqs = []
    for i, (table, kv_len, n) in enumerate(zip(tables, kv_lens, num_new)):
        req = Request(f"r{i}", [0] * kv_len, SamplingParams())
        req.block_table, req.num_computed_tokens = table, kv_len - n
        reqs.append(req)
    return reqs


def run_case(name: str, reqs: list[Request], num_new: list[int], reps: int) -> None:
    cpu = torch.device("cpu")
    done = [r.num_computed_tokens for r in reqs]
    first_sync = median_ms(lambda: BlockTableMirror().sync(reqs), max(reps // 5, 3))
    mirror = BlockTableMirror()
    mirror.sync(reqs)
    sync = median_ms(lambda: mirror.sync(reqs), reps)
    tables = mirror.sync(reqs)
    decode = all(n == 1 for n in num_new)
    plan_ms, plan = 0.0, None
    if decode:
        kv_lens = [d + 1 for d in done]
        plan_ms = median_ms(lambda: plan_cascade(tables, kv_lens, PS, "auto"), reps)
        plan = plan_cascade(tables, kv_lens, PS, "auto")
    order = plan.order if plan else list(range(len(reqs)))
    ordered = tables.take(order)
    done_o, new_o = [done[i] for i in order], [num_new[i] for i in order]
    build = median_ms(lambda: build_metadata(ordered, done_o, new_o, PS, cpu, plan), reps)
    cascade = f"cascade over {plan.num_cascade_reqs}" if plan else "no cascade"
    print(f"{name:<34} sync {sync:6.3f}  plan {plan_ms:6.3f}  build {build:6.3f}  "
          f"total {sync + plan_ms + build:6.3f} ms  (first sync {first_sync:.2f} ms; {cascade})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    shared = list(range(2048))
    tables = [shared + list(range(2048 + 17 * i, 2048 + 17 * (i + 1))) for i in range(128)]
    kv_len = (2048 + 16) * PS + 6  # the 17th own page holds the newest token
    run_case("cascade 128 x (2048 + 17 pages)", make_requests(tables, [kv_len] * 128, [1] * 128),
             [1] * 128, args.reps)
    tables = [list(range(64 * i, 64 * (i + 1))) for i in range(128)]
    run_case("plain 128 x 64 pages", make_requests(tables, [64 * PS] * 128, [1] * 128),
             [1] * 128, args.reps)
    run_case("prefill 1 x 8192 new tokens", make_requests([list(range(512))], [8192], [8192]),
             [8192], args.reps)


if __name__ == "__main__":
    main()

"""Cascade attention vs plain decode: the calibration grid for `cascade_pays` and engine runs.

Part 1, `grid`: the attention of one decode step (metadata, plan, and 32 layers of K/V write +
attention, Llama-3-8B heads 32/8 x 128, page 16, bf16) for G requests sharing an S-token prefix,
each with U tokens of its own, cascade vs plain, on the backend directly. Each layer reads its
own pool (up to 32 distinct ones) so the L2 cache does not flatter small cases. It prints which
is faster where, and the `auto` rule (min_group_size, min_saved_tokens) that loses the least time.

Part 2, `engine`: the whole decode step of Llama-3-8B (dummy weights, CUDA graphs on) in one
engine, switching `cascade` between auto / on / off on the same running batch: 128 requests
sharing a 32K prefix (256 tokens each of their own; target >= 4.5x) and smaller cases around
the rule's boundary. "on" replays the cascade CUDA graphs (for one group of >= 128 requests
over >= 8K tokens, the split graph: engine/attention/split_shared_level.py); "fa2" replays them
with split graphs off; "eager" is the same cascade step launched eagerly (the graphs set
aside). Each step is printed against its floor measured in the same run: weights + KV read at
the copy bandwidth, the KV being every request's whole context for plain decode and the shared
prefix once plus each request's own tokens for cascade. Last, the `auto` rules
(engine/attention/cascade.py `CascadeRule`) that lose the least time over these rows: the
re-calibration of `AUTO_RULE`.

    python -m bench.gpu_cascade grid
    python -m bench.gpu_cascade engine --cases 128x32768x256,16x2048x128
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import random
import time

import torch

from bench.gpu_floor import decode_bytes, emit_row, llama3_8b_dir, measure_floor, wall_time_ms
from engine.attention import cascade as cascade_rule
from engine.attention.cascade import CascadeRule, plan_cascade
from engine.attention.metadata import build_metadata
from engine.block_table import PageRows

HQ, HKV, D, PS, LAYERS = 32, 8, 128, 16, 32
PAGE_BYTES = 2 * PS * HKV * D * 2


# -- part 1: the attention-only grid ------------------------------------------------------------
def _case(group: int, shared: int, own: int, rng: random.Random):
    """Tables and KV lengths (grouped requests first) and the number of pages they use."""
    shared_pages = shared // PS
    own_pages = -(-(own + 1) // PS)
    num_pages = shared_pages + group * own_pages
    perm = list(range(num_pages))
    rng.shuffle(perm)
    prefix = perm[:shared_pages]
    tables = [prefix + perm[shared_pages + i * own_pages:shared_pages + (i + 1) * own_pages]
              for i in range(group)]
    return tables, [shared + own + 1] * group, num_pages


def attention_step_ms(backend, pool: torch.Tensor, group: int, shared: int, own: int,
                      rng: random.Random) -> dict:
    tables, kv_lens, num_pages = _case(group, shared, own, rng)
    views = max(1, min(LAYERS, pool.shape[0] // num_pages))
    caches = [pool[i * num_pages:(i + 1) * num_pages] for i in range(views)]
    plan = plan_cascade(tables, kv_lens, PS, mode="on")
    assert plan is not None and plan.num_cascade_reqs == group
    dev = pool.device
    q = torch.randn(group, HQ, D, device=dev).to(torch.bfloat16)
    kv = torch.randn(group, 2, HKV, D, device=dev).to(torch.bfloat16)
    done, new = [n - 1 for n in kv_lens], [1] * group
    rows = PageRows.from_lists(tables)  # as the runner's mirror holds them (plan order = batch)

    def step(cascade):
        meta = build_metadata(rows, done, new, PS, dev, plan if cascade else None)
        attn = backend.plan(meta)
        for layer in range(LAYERS):
            attn.forward(layer, q, kv[:, 0], kv[:, 1], caches[layer % views])

    plain_bytes = sum(kv_lens) * PAGE_BYTES // PS * LAYERS
    reps = 3 if plain_bytes > 20e9 else 7
    plain = wall_time_ms(lambda: step(False), reps)
    casc = wall_time_ms(lambda: step(True), reps)
    return {"group": group, "shared": shared, "own": own, "plain_ms": plain, "cascade_ms": casc,
            "speedup": plain / casc, "saved_tokens": (group - 1) * shared}


def _regret(rows: list[dict], rule: CascadeRule) -> float:
    """Summed extra time (ms per step) of the rule's choices over the faster choice; rows hold
    group, shared, cascade_ms and plain_ms."""
    lost = 0.0
    for r in rows:
        chosen = r["cascade_ms"] if rule.pays(r["group"], r["shared"]) else r["plain_ms"]
        lost += chosen - min(r["cascade_ms"], r["plain_ms"])
    return lost


def print_rules(rows: list[dict], title: str) -> None:
    """The current rule's loss over the rows, the rules that lose the least, and the rows where
    the current rule picks the slower path."""
    cur = cascade_rule.AUTO_RULE
    cands = [CascadeRule(mg, ms) for mg in (2, 3, 4, 6, 8, 12, 16, 32)
             for ms in sorted({2**k for k in range(12, 23)} | {cur.min_saved_tokens})]
    least = min(_regret(rows, c) for c in cands)
    best = [c for c in cands if _regret(rows, c) <= least + 1e-9]
    print(f"\n{title}: current rule {cur}: loses {_regret(rows, cur):.2f} ms over the rows")
    print(f"least loss {least:.2f} ms, by (min_group_size: min_saved_tokens range):")
    for mg in sorted({c.min_group_size for c in best}):
        saved = [c.min_saved_tokens for c in best if c.min_group_size == mg]
        print(f"  {mg:>3}: {min(saved):,} .. {max(saved):,}")
    for r in rows:
        if (r["cascade_ms"] < r["plain_ms"]) != cur.pays(r["group"], r["shared"]):
            worse = abs(r["cascade_ms"] - r["plain_ms"])
            print(f"  current rule picks the slower path at G={r['group']} S={r['shared']} "
                  f"U={r['own']}: {worse:.3f} ms lost (plain / cascade "
                  f"{r['plain_ms'] / r['cascade_ms']:.2f}x)")


def _make_backend(cascade_backend: str):
    from engine.attention.flashinfer_backend import FlashInferBackend

    backend = FlashInferBackend(num_q_heads=HQ, num_kv_heads=HKV, head_dim=D,
                                dtype=torch.bfloat16, device="cuda", page_size=PS,
                                cascade_backend=cascade_backend)
    backend.warmup()
    return backend


def grid(args) -> None:
    backend = _make_backend(args.cascade_backend)
    pool_pages = int(args.pool_gb * 1e9) // PAGE_BYTES
    pool = torch.randn(pool_pages, 2, PS, HKV, D, device="cuda", dtype=torch.bfloat16)
    rng = random.Random(0)
    rows = []
    for g, s, u in itertools.product(args.groups, args.shared, args.own):
        row = attention_step_ms(backend, pool, g, s, u, rng)
        rows.append(row)
        emit_row(row, "cascade_grid", args.out)
    print("\nspeedup of cascade over plain decode (attention of one step, 32 layers), per U:")
    for u in args.own:
        print(f"U={u}: rows G, columns S")
        print("      " + "".join(f"{s:>8}" for s in args.shared))
        for g in args.groups:
            cells = [r["speedup"] for r in rows if r["group"] == g and r["own"] == u]
            print(f"{g:>6}" + "".join(f"{c:8.2f}" for c in cells))
    if args.compare_backend:
        other = _make_backend(args.compare_backend)
        print(f"\ncascade levels on {args.cascade_backend} vs {args.compare_backend} (ms/step):")
        for g, sh, u in ((16, 2048, 128), (64, 8192, 128), (128, 32768, 256)):
            a = attention_step_ms(backend, pool, g, sh, u, random.Random(5))
            b = attention_step_ms(other, pool, g, sh, u, random.Random(5))
            print(f"  G={g} S={sh} U={u}: plain {a['plain_ms']:.2f}, cascade "
                  f"{args.cascade_backend} {a['cascade_ms']:.2f}, cascade {args.compare_backend} "
                  f"{b['cascade_ms']:.2f}")
        del other
    print_rules(rows, "attention-only grid")


# -- part 2: whole engine steps -----------------------------------------------------------------
# The paths timed per case: cascade "auto", cascade "on" (the cascade CUDA graphs, split where
# the backend picks it), "fa2" (the same with split graphs off: every shared level on FA2),
# "eager" (cascade on, its graphs set aside, as before they existed), plain decode ("off").
ENGINE_MODES = ("auto", "on", "fa2", "eager", "off")


def engine_case(llm, group: int, shared: int, own: int, steps: int, rng: random.Random,
                floor, profile: bool = False, host_profile: bool = False) -> dict:
    from bench.gpu_decode import StepTimer, add_requests, run_until_decoding

    engine = llm.engine
    vocab = engine.arch.vocab_size
    prefix = [rng.randrange(vocab) for _ in range(shared)]
    prompts = [prefix + [rng.randrange(vocab) for _ in range(own)] for _ in range(group)]
    max_tokens = 8 * steps + 16
    first = add_requests(engine, prompts[:1], max_tokens)  # computes and caches the prefix
    run_until_decoding(engine, first)
    rids = first + add_requests(engine, prompts[1:], max_tokens)
    run_until_decoding(engine, rids)
    assert sum(engine.scheduler.requests[r].num_cached_tokens >= shared for r in rids) == group - 1
    timer = getattr(llm, "_timer", None) or StepTimer(engine)
    llm._timer = timer
    runner = engine.runner
    base_cfg = runner.cfg
    row = {"group": group, "shared": shared, "own": own}
    graphs = runner.graphs  # the CudaGraphRunner
    buffers = runner.backend.graph_buffers
    for mode in ENGINE_MODES:
        runner.cfg = dataclasses.replace(base_cfg, cascade=mode if mode in ("auto", "off")
                                         else "on")
        aside, graphs.cascade_graphs = graphs.cascade_graphs, ({} if mode == "eager"
                                                               else graphs.cascade_graphs)
        buffers.split_on = mode != "fa2"
        by_kind = graphs.replays_by_kind  # cascade replays per graph kind
        before = (runner.num_cascade_steps, graphs.num_cascade_replays, by_kind["cascade_split"])
        step_s, runner_s, _ = timer.steps(steps if mode != "off" or shared < 16384 else 4)
        graphs.cascade_graphs, buffers.split_on = aside, True
        row[f"{mode}_ms"] = step_s * 1e3
        row[f"{mode}_cascade_steps"] = runner.num_cascade_steps - before[0]
        row[f"{mode}_cascade_graph_steps"] = graphs.num_cascade_replays - before[1]
        row[f"{mode}_split_graph_steps"] = by_kind["cascade_split"] - before[2]
    # The floors of this batch, as it stands after the timed steps: weights + KV at the copy
    # bandwidth measured in this run; plain decode reads every request's whole context, a
    # cascade step the shared prefix once and each request's own tokens.
    lens = [r.num_tokens for r in engine.scheduler.running]
    weights, kv_plain = decode_bytes(engine.arch, lens)
    _, kv_cascade = decode_bytes(engine.arch, [shared] + [n - shared for n in lens])
    row["floor_plain_ms"] = (weights + kv_plain) / floor.copy_bytes_per_s * 1e3
    row["floor_cascade_ms"] = (weights + kv_cascade) / floor.copy_bytes_per_s * 1e3
    row["on_x_floor"] = row["on_ms"] / row["floor_cascade_ms"]
    row["eager_x_floor"] = row["eager_ms"] / row["floor_cascade_ms"]
    row["off_x_floor"] = row["off_ms"] / row["floor_plain_ms"]
    # Host work of one step's planning on this batch (the GPU waits during it), replayed on
    # the last step's shape (the next token's page may not be allocated yet).
    reqs = list(engine.scheduler.running)
    done = [r.num_computed_tokens - 1 for r in reqs]
    ts = time.perf_counter()
    tables = runner.block_tables.sync(reqs)  # the runner's mirror: nothing new to copy
    t0 = time.perf_counter()
    plan = plan_cascade(tables, [d + 1 for d in done], PS, mode="on")
    t1 = time.perf_counter()
    build_metadata(tables.take(plan.order), [done[i] for i in plan.order],
                   [1] * len(reqs), PS, engine.device, plan)
    t2 = time.perf_counter()
    build_metadata(tables, done, [1] * len(reqs), PS, engine.device)
    t3 = time.perf_counter()
    row.update(host_sync_ms=(t0 - ts) * 1e3, host_plan_cascade_ms=(t1 - t0) * 1e3,
               host_metadata_cascade_ms=(t2 - t1) * 1e3, host_metadata_plain_ms=(t3 - t2) * 1e3)
    if profile:
        from bench.gpu_decode import print_kernel_profile

        runner.cfg = dataclasses.replace(base_cfg, cascade="on")
        print_kernel_profile(engine.step, f"{group}x{shared}x{own} cascade step (graph)",
                             reps=3)
        buffers.split_on = False
        print_kernel_profile(engine.step, f"{group}x{shared}x{own} cascade step (graph, FA2 "
                             "shared level)", reps=3)
        buffers.split_on = True
        # the same step launched eagerly: the lists differ in what the graph changes
        aside, graphs.cascade_graphs = graphs.cascade_graphs, {}
        print_kernel_profile(engine.step, f"{group}x{shared}x{own} cascade step (eager)",
                             reps=3)
        graphs.cascade_graphs = aside
    if host_profile:
        import cProfile
        import pstats

        for mode in ("on", "off"):
            runner.cfg = dataclasses.replace(base_cfg, cascade=mode)
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(3):
                engine.step()
            prof.disable()
            print(f"\n{group}x{shared}x{own}: host profile of 3 steps, cascade {mode}")
            pstats.Stats(prof).sort_stats("tottime").print_stats(14)
    runner.cfg = base_cfg
    for rid in rids:
        engine.abort(rid)
    row["speedup_on_vs_off"] = row["off_ms"] / row["on_ms"]
    row["speedup_eager_vs_off"] = row["off_ms"] / row["eager_ms"]
    row["auto_picked"] = "cascade" if row["auto_cascade_steps"] else "plain"
    row["faster"] = "cascade" if row["on_ms"] < row["off_ms"] else "plain"
    return row


def engine_runs(args) -> None:
    cases = [tuple(int(x) for x in c.split("x")) for c in args.cases.split(",")]
    max_len = max(s + u for _, s, u in cases) + 8 * args.steps + 64
    num_pages = max(s // PS + g * -(-(u + 8 * args.steps + 32) // PS) for g, s, u in cases) + 512
    from engine.attention import split_shared_level
    from engine.llm import LLM

    if args.split_min:  # before the engine builds its graphs: buckets from MIN_QUERIES get one
        queries, tokens = (int(x) for x in args.split_min.split(":"))
        split_shared_level.MIN_QUERIES, split_shared_level.MIN_SHARED_TOKENS = queries, tokens
        print(f"split graphs from {queries} queries over {tokens} tokens", flush=True)
    floor = measure_floor()
    print(floor, flush=True)
    llm = LLM(llama3_8b_dir(), load_format="dummy", dtype="bfloat16", device="cuda",
              attention_backend="flashinfer", cuda_graphs=True, cascade="auto",
              max_num_seqs=max(g for g, _, _ in cases), max_num_batched_tokens=16384,
              max_model_len=max_len, num_pages=num_pages, enable_prefix_caching=True)
    graph_error = llm.engine.runner.graphs.cascade_graph_error
    print(f"cascade CUDA graphs: {'captured' if graph_error is None else graph_error}",
          flush=True)
    rng = random.Random(1)
    rows = []
    for g, s, u in cases:
        first = not rows
        row = engine_case(llm, g, s, u, args.steps, rng, floor, profile=args.profile and first,
                          host_profile=args.host_profile and first)
        row["device"] = floor.device
        rows.append(row)
        emit_row(row, "cascade_engine", args.out)
    print(f"\nLlama-3-8B decode step (ms), cascade auto / on (graphs) / fa2 (graphs, no split "
          f"shared level) / eager / off in one engine; graphed: on's steps that replayed a "
          f"graph (split ones) / its cascade steps; floors from {floor}")
    print(f"{'G x S x U':>16} {'auto':>7} {'on':>7} {'fa2':>7} {'eager':>7} {'off':>7}"
          f" {'floor c':>8} {'floor p':>8} {'on/fl':>6} {'off/fl':>6} {'on vs off':>9}"
          f" {'graphed':>10} {'auto picked':>11} {'faster':>8}")
    for r in rows:
        name = f"{r['group']}x{r['shared']}x{r['own']}"
        graphed = (f"{r['on_cascade_graph_steps']}({r['on_split_graph_steps']})"
                   f"/{r['on_cascade_steps']}")
        print(f"{name:>16} {r['auto_ms']:7.2f} {r['on_ms']:7.2f} {r['fa2_ms']:7.2f}"
              f" {r['eager_ms']:7.2f}"
              f" {r['off_ms']:7.2f} {r['floor_cascade_ms']:8.2f} {r['floor_plain_ms']:8.2f}"
              f" {r['on_x_floor']:6.2f} {r['off_x_floor']:6.2f} {r['speedup_on_vs_off']:8.2f}x"
              f" {graphed:>10} {r['auto_picked']:>11} {r['faster']:>8}")
    print_rules([{"group": r["group"], "shared": r["shared"], "own": r["own"],
                  "cascade_ms": r["on_ms"], "plain_ms": r["off_ms"]} for r in rows],
                "engine rows (cascade = on, plain = off)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="part", required=True)
    g = sub.add_parser("grid")
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    g.add_argument("--groups", type=ints, default=ints("2,4,8,16,32,64,128"))
    g.add_argument("--shared", type=ints, default=ints("256,1024,2048,4096,8192,32768"))
    g.add_argument("--own", type=ints, default=ints("128,1024"))
    g.add_argument("--pool-gb", type=float, default=20.0)
    g.add_argument("--cascade-backend", default="fa2", help="kernel of the cascade levels")
    g.add_argument("--compare-backend", help="also time a few cases with this one")
    g.add_argument("--out")
    e = sub.add_parser("engine")
    e.add_argument("--cases", default="128x32768x256,16x2048x128,64x2048x256,32x8192x128,"
                   "128x8192x128,64x16384x128,32x32768x128,64x32768x128,128x2048x128,"
                   "16x8192x128")
    e.add_argument("--profile", action="store_true", help="kernel profile of the first case "
                   "(eager launches stay slower in the process afterwards: use alone)")
    e.add_argument("--host-profile", action="store_true", help="cProfile of the first case")
    e.add_argument("--steps", type=int, default=10)
    e.add_argument("--split-min", help="QUERIES:TOKENS, the split graphs' thresholds for this "
                   "run (engine/attention/split_shared_level.py; default: its MIN_QUERIES and "
                   "MIN_SHARED_TOKENS), to measure other shapes")
    e.add_argument("--out")
    args = ap.parse_args()
    grid(args) if args.part == "grid" else engine_runs(args)


if __name__ == "__main__":
    main()

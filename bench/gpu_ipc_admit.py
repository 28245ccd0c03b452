"""What admitting `cuda_ipc` KV costs the decode replica's step thread, phase by phase.

    python -m bench.gpu_ipc_admit [--prompt-len 512] [--count 64] [--busy-ms 8]

A sender process (as the prefill replica) exports prompts' pages the way `CudaIpcTransport.send`
does; this process (as the decode replica) maps each handle (`receive`), scatters the pages
into a KV pool (`KVPool.write_pages`, what `Engine.admit_prefilled` runs between two steps) and
drops the mapped tensor. Prints the mean host time of each phase, the Llama-3-8B KV shape.
`--busy-ms` queues a GPU kernel of about that long before each admit, as the decode step in
flight is with overlapped scheduling: a phase that waits for the GPU then takes that long.
"""

from __future__ import annotations

import argparse
import pickle
import time
from multiprocessing.reduction import ForkingPickler

import torch
import torch.multiprocessing as mp

from engine.host_copy import index_tensor

LAYERS, PAGE, HKV, D = 32, 16, 8, 128


def sender(q_out, q_back, num_pages: int, count: int) -> None:
    pool = torch.randn(LAYERS, 4 * num_pages, 2, PAGE, HKV, D, device="cuda",
                       dtype=torch.bfloat16)
    idx = torch.arange(num_pages, device="cuda")
    for _ in range(count):
        data = pool.index_select(1, idx)  # a fresh export, as read_pages makes
        torch.cuda.ipc_collect()
        q_out.put(bytes(ForkingPickler.dumps(data)))
        q_back.get()  # the receiver is done with it: next


def _cycles_per_ms() -> float:
    """How many `torch.cuda._sleep` cycles last a millisecond on this GPU (measured)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1_000_000)  # warm-up
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    end.synchronize()
    return 10_000_000 / start.elapsed_time(end)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--count", type=int, default=64)
    ap.add_argument("--busy-ms", type=float, default=0.0)
    args = ap.parse_args(argv)
    num_pages = -(-args.prompt_len // PAGE)
    ctx = mp.get_context("spawn")
    q_out, q_back = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=sender, args=(q_out, q_back, num_pages, args.count))
    proc.start()
    layers = [torch.zeros(2048, 2, PAGE, HKV, D, device="cuda", dtype=torch.bfloat16)
              for _ in range(LAYERS)]
    phases = {"map (pickle.loads)": 0.0, "index tensor": 0.0, "scatter launches": 0.0,
              "drop mapped tensor": 0.0, "GPU drain": 0.0}
    cycles = int(args.busy_ms * _cycles_per_ms()) if args.busy_ms else 0
    for i in range(args.count):
        blob = q_out.get()
        if cycles:
            torch.cuda._sleep(cycles)
        t0 = time.perf_counter()
        data = pickle.loads(blob)
        t1 = time.perf_counter()
        pages = list(range(100 + i % 8 * num_pages, 100 + i % 8 * num_pages + num_pages))
        idx = index_tensor(pages, torch.device("cuda"))  # as KVPool.write_pages makes it
        t2 = time.perf_counter()
        for layer, src in zip(layers, data):
            layer.index_copy_(0, idx, src)
        t3 = time.perf_counter()
        del data, src
        t4 = time.perf_counter()
        torch.cuda.synchronize()
        t5 = time.perf_counter()
        q_back.put(None)
        if i >= 4:  # warm-up
            for name, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                phases[name] += dt
    proc.join()
    n = args.count - 4
    print(f"cuda_ipc admit of a {args.prompt_len}-token prompt ({num_pages} pages, "
          f"{num_pages * LAYERS * 2 * PAGE * HKV * D * 2 / 2**20:.0f} MiB), mean of {n}:")
    for name, total in phases.items():
        print(f"  {name:22s} {1e3 * total / n:7.3f} ms")


if __name__ == "__main__":
    main()

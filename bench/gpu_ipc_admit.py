"""What admitting `cuda_ipc` KV costs the decode replica's step thread, phase by phase.

    python -m bench.gpu_ipc_admit [--prompt-len 512] [--count 64] [--busy-ms 8]

A sender process (as the prefill replica) exports prompts' pages with `CudaIpcTransport.send`;
this process (as the decode replica) receives each one and scatters the pages into a KV pool,
as `Engine.admit_prefilled` does between two steps, then drops the payload. Three receive paths:
- `mapped` (the transport until 2026-12-02, 00:40 UTC): torch's unpickling maps the handle on
  the event loop, and the step thread scatters from, then releases, the sender's memory;
- `torch-copied` (until 2026-12-02, 03:30 UTC): a worker thread maps it through torch, copies it
  on a stream of its own and releases torch's mapping (which unmaps holding the GIL);
- `copied` (`CudaIpcTransport.take`): the same through ctypes calls, none holding the GIL.
The step thread scatters from the copy in both `copied` paths. `--busy-ms` queues a GPU kernel
of about that long before each admit, as the decode step in flight is with overlapped
scheduling: a step-thread phase that waits for the GPU then takes about that long. Prints the
mean host time of each phase, and the longest the GIL kept another thread (a 0.5 ms ticker)
waiting during the receive, the Llama-3-8B KV shape.
"""

from __future__ import annotations

import argparse
import dataclasses
import pickle
import threading
import time
from multiprocessing.reduction import ForkingPickler

import torch
import torch.multiprocessing as mp

from engine.host_copy import index_tensor
from kvtransfer.cuda_ipc import CudaIpcTransport
from kvtransfer.payload import KVPayload

LAYERS, PAGE, HKV, D = 32, 16, 8, 128


def sender(q_out, q_back, num_pages: int, count: int, torch_format: bool) -> None:
    pool = torch.randn(LAYERS, 4 * num_pages, 2, PAGE, HKV, D, device="cuda",
                       dtype=torch.bfloat16)
    idx = torch.arange(num_pages, device="cuda")
    transport = CudaIpcTransport()
    for _ in range(count):
        data = pool.index_select(1, idx)  # a fresh export, as read_pages makes
        payload = KVPayload.from_tensor(data, PAGE, 0, [], "bench")
        q_out.put(bytes(ForkingPickler.dumps(payload)) if torch_format
                  else transport.send(payload))
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


def torch_take(blob: bytes, stream: torch.cuda.Stream) -> KVPayload:
    """The `torch-copied` receive, as CudaIpcTransport.take was until 2026-12-02 03:30 UTC."""
    with torch.cuda.stream(stream):
        mapped = pickle.loads(blob)  # torch maps the sender's block
        data = mapped.data.clone()
        stream.synchronize()
        payload = dataclasses.replace(mapped, data=data)
        del mapped  # torch syncs the stream and unmaps, holding the GIL
    return payload


class Ticker(threading.Thread):
    """Wakes every 0.5 ms; `longest()` is the longest it overslept since `reset()`: how long
    another thread held the GIL (or the machine was busy)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.last, self.worst = time.perf_counter(), 0.0
        self.done = threading.Event()

    def reset(self) -> None:
        self.last, self.worst = time.perf_counter(), 0.0

    def longest(self) -> float:
        return max(self.worst, time.perf_counter() - self.last)

    def run(self) -> None:
        while not self.done.is_set():
            time.sleep(0.0005)
            now = time.perf_counter()
            self.worst, self.last = max(self.worst, now - self.last), now


def run(path: str, prompt_len: int, count: int, busy_ms: float) -> None:
    num_pages = -(-prompt_len // PAGE)
    ctx = mp.get_context("spawn")
    q_out, q_back = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=sender, args=(q_out, q_back, num_pages, count, path != "copied"))
    proc.start()
    pool = torch.zeros(LAYERS, 2048, 2, PAGE, HKV, D, device="cuda", dtype=torch.bfloat16)
    transport, device = CudaIpcTransport(), torch.device("cuda", torch.cuda.current_device())
    cycles = int(busy_ms * _cycles_per_ms()) if busy_ms else 0
    stream, ticker = torch.cuda.Stream(), Ticker()
    ticker.start()
    gil_wait = 0.0
    names = ("receive (off the step thread)", "step: index tensor", "step: scatter launch",
             "step: drop payload", "GPU drain")
    phases = dict.fromkeys(names, 0.0)
    for i in range(count):
        blob = q_out.get()
        if cycles:
            torch.cuda._sleep(cycles)
        ticker.reset()
        t0 = time.perf_counter()
        if path == "mapped":
            payload = pickle.loads(blob)
        elif path == "torch-copied":
            payload = torch_take(blob, stream)
        else:
            payload = transport.take(blob, device)
        t1 = time.perf_counter()
        longest = ticker.longest()
        pages = list(range(100 + i % 8 * num_pages, 100 + i % 8 * num_pages + num_pages))
        # The index KVPool.write_pages made until run 52; it now copies a prompt's few runs of
        # pages as slices without one, so this phase measures what that change removed.
        idx = index_tensor(pages, device)
        t2 = time.perf_counter()
        pool.index_copy_(1, idx, payload.data)
        if path != "mapped":  # the copy came from the transport's stream (KVPool does this)
            payload.data.record_stream(torch.cuda.current_stream())
        t3 = time.perf_counter()
        del payload
        t4 = time.perf_counter()
        torch.cuda.synchronize()
        t5 = time.perf_counter()
        q_back.put(None)
        if i >= 4:  # warm-up
            for name, dt in zip(names, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                phases[name] += dt
            gil_wait += longest
    proc.join()
    ticker.done.set()
    n = count - 4
    print(f"cuda_ipc admit, {path}, of a {prompt_len}-token prompt ({num_pages} pages, "
          f"{num_pages * LAYERS * 2 * PAGE * HKV * D * 2 / 2**20:.0f} MiB), GPU busy "
          f"{busy_ms:g} ms before each, mean of {n}:")
    for name, total in phases.items():
        print(f"  {name:30s} {1e3 * total / n:7.3f} ms")
    print(f"  {'receive: longest GIL wait':30s} {1e3 * gil_wait / n:7.3f} ms (mean of the "
          f"longest 0.5 ms tick per receive)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--count", type=int, default=64)
    ap.add_argument("--busy-ms", type=float, default=0.0)
    ap.add_argument("--paths", default="mapped,torch-copied,copied")
    args = ap.parse_args(argv)
    for path in args.paths.split(","):
        run(path, args.prompt_len, args.count, args.busy_ms)


if __name__ == "__main__":
    main()

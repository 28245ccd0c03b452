"""KV over a channel transport between two processes, against a direct copy between the same two
devices, measured in the same run.

- `nccl`: the sender process on cuda:0, the receiver (this process) on cuda:1; the baseline is
  a cuda:0 -> cuda:1 `copy_` (peer-to-peer over NVLink where there is one). Needs 2 GPUs.
- `gloo`: both on CPU (what CI can run); the baseline is a host memcpy.

Each transfer is timed at the receiver, from `receive` to the payload in place (pairing is done
by an untimed warm-up), and reported as GB/s and as a share of the copy's rate.

    python -m bench.channel_transfer --backend nccl --mib 256 [--chunk-mib 64] [--reps 5]
    python -m bench.gpu_transfer --channel nccl     (the same, from the transfer benchmark)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import statistics
import time

import torch

from kvtransfer import KVPayload
from kvtransfer.channel_transport import GlooTransport, NcclTransport

LAYERS = 32  # payload rows: Llama-3-8B's layers


def _device(backend: str, rank: int) -> torch.device:
    return torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")


def _payload(nbytes: int, device: torch.device, seed: int) -> KVPayload:
    per_layer = nbytes // LAYERS // 2  # bf16
    g = torch.Generator(device=device).manual_seed(seed)
    data = torch.randn(LAYERS, 1, per_layer, generator=g, device=device).to(torch.bfloat16)
    return KVPayload.from_tensor(data, 16, 0, [], "bench")


def _sender(backend: str, nbytes: int, chunk_bytes: int, reps: int, q, done) -> None:
    dev = _device(backend, 0)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    cls = NcclTransport if backend == "nccl" else GlooTransport
    t = cls(timeout_s=300, chunk_bytes=chunk_bytes, host="127.0.0.1")
    for i in range(reps + 1):  # the first is the warm-up
        q.put(t.send(_payload(nbytes, dev, i)))
    done.wait(600)
    t.close()


def copy_gbps(backend: str, nbytes: int, reps: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=_device(backend, 0)).fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=_device(backend, 1))
    times = []
    for _ in range(reps + 1):
        _sync(backend)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(backend)
        times.append(time.perf_counter() - start)
    return nbytes / statistics.median(times[1:]) / 1e9


def _sync(backend: str) -> None:
    if backend == "nccl":
        for i in range(2):
            torch.cuda.synchronize(i)


def run(backend: str, mib: int, chunk_mib: int, reps: int) -> dict:
    if backend == "nccl" and torch.cuda.device_count() < 2:
        raise SystemExit("the nccl benchmark needs 2 GPUs (sender cuda:0, receiver cuda:1)")
    nbytes = mib << 20
    ctx = mp.get_context("spawn")
    q, done = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_sender, args=(backend, nbytes, chunk_mib << 20, reps, q, done))
    proc.start()
    dev = _device(backend, 1)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    recv = (NcclTransport if backend == "nccl" else GlooTransport)(timeout_s=300)
    times, exact = [], True
    try:
        for i in range(reps + 1):
            handle = q.get(timeout=300)
            start = time.perf_counter()
            got = asyncio.run(recv.receive(handle, dev))
            elapsed = time.perf_counter() - start
            # the same seed gives the same numbers on either device: check every byte
            exact &= torch.equal(got.data, _payload(nbytes, dev, i).data)
            if i:
                times.append(elapsed)
    finally:
        done.set()
        proc.join(60)
        recv.close()
    chan = nbytes / statistics.median(times) / 1e9
    base = copy_gbps(backend, nbytes, reps)
    return {"backend": backend, "payload_mib": mib, "chunk_mib": chunk_mib, "reps": reps,
            "channel_gbps": round(chan, 2), "copy_gbps": round(base, 2),
            "share_of_copy": round(chan / base, 3),
            "median_ms": round(statistics.median(times) * 1e3, 2), "payloads_equal": exact}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", choices=("nccl", "gloo"), default="nccl")
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--chunk-mib", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args(argv)
    print(json.dumps(run(a.backend, a.mib, a.chunk_mib, a.reps)))


if __name__ == "__main__":
    main()

"""KV transfer through Ray's object store against the host link, measured in the same run.

The link: 1 GiB copies between the GPU and pinned (and, for contrast, pageable) host memory.
The transport: one Llama-3-8B request's KV (128 KiB per token, bf16) sent and received on one
node, timed by wall clock and reported as GB/s and as a share of the pinned link rate, for
- `pageable`: the transport before pinned staging (`.cpu()`, `ray.put`; `ray.get`, `.to(cuda)`);
- `staged`: `RayObjectStoreTransport` (pinned slots, chunks of whole layers, a side stream);
- `dma only`: the staged device <-> pinned copies with no object store, the pipeline's ceiling.

    python -m bench.gpu_transfer [--tokens 512,4096] [--chunk-mib 8,32,128]
    python -m bench.gpu_transfer --channel nccl    (2 GPUs: the nccl channel vs a GPU-GPU copy)
"""

from __future__ import annotations

import argparse
import asyncio
import json

import ray
import torch

from bench.gpu_floor import wall_time_ms
from kvtransfer import KVPayload
from kvtransfer.pinned_staging import PinnedStaging
from kvtransfer.ray_object_store import RayObjectStoreTransport

KV_SHAPE = (32, 2, 16, 8, 128)  # per page: layers first, then [2, page, Hkv, D]


def link_gbps(nbytes: int = 1 << 30) -> dict[str, float]:
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    out = {}
    for kind, pinned in (("pinned", True), ("pageable", False)):
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
        host.fill_(1)  # touch every page, so the first copy pays no page faults
        h2d = wall_time_ms(lambda h=host: dev.copy_(h, non_blocking=True))
        d2h = wall_time_ms(lambda h=host: h.copy_(dev, non_blocking=True))
        out[f"H2D {kind}"], out[f"D2H {kind}"] = nbytes / h2d / 1e6, nbytes / d2h / 1e6
    return out


def kv_pages(tokens: int) -> torch.Tensor:
    layers, *page = KV_SHAPE
    pages = -(-tokens // page[1])
    return torch.randn(layers, pages, *page, device="cuda").to(torch.bfloat16)


def pageable_round(data: torch.Tensor) -> tuple[float, float]:
    def send():
        return ray.put(data.cpu().view(torch.int16).numpy())

    def receive(ref):
        return torch.from_numpy(ray.get(ref)).view(torch.bfloat16).to("cuda")

    ref = send()
    send_ms = wall_time_ms(send)  # each result is dropped at once, which frees its object
    recv_ms = wall_time_ms(lambda: receive(ref))
    return send_ms, recv_ms


def staged_round(data: torch.Tensor, chunk_bytes: int) -> tuple[float, float]:
    transport = RayObjectStoreTransport(chunk_bytes)
    payload = KVPayload.from_tensor(data, 16, 0, [], "bench")

    handle = transport.send(payload)
    send_ms = wall_time_ms(lambda: transport.send(payload))
    recv_ms = wall_time_ms(lambda: asyncio.run(transport.receive(handle, "cuda")))
    return send_ms, recv_ms


def dma_round(data: torch.Tensor, chunk_bytes: int) -> tuple[float, float]:
    staging = PinnedStaging(chunk_bytes)
    host = data.cpu()
    chunks = [(a, b, host[a:b]) for a, b in staging.chunks(data.shape, data.dtype)]
    out = torch.empty_like(data)
    return (wall_time_ms(lambda: staging.to_host(data, lambda *_: None)),
            wall_time_ms(lambda: staging.to_device(chunks, out)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="512,4096")
    ap.add_argument("--chunk-mib", default="8,32,128")
    ap.add_argument("--channel", choices=("nccl", "gloo"), default=None,
                    help="instead: a 256 MiB payload over this channel transport between two "
                         "processes vs a copy between the same devices (bench.channel_transfer)")
    args = ap.parse_args()
    if args.channel:
        from bench.channel_transfer import run

        print(json.dumps(run(args.channel, 256, 64, 5)))
        return
    ray.init(include_dashboard=False, log_to_driver=False)
    link = link_gbps()
    print(f"# {torch.cuda.get_device_name()}, link GB/s: "
          + ", ".join(f"{k} {v:.1f}" for k, v in link.items()))
    print("| tokens | MiB | path | chunk MiB | send ms | send GB/s | send / D2H link "
          "| receive ms | receive GB/s | receive / H2D link | both GB/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for tokens in (int(t) for t in args.tokens.split(",")):
        data = kv_pages(tokens)
        nbytes = data.numel() * data.element_size()
        rows = [("pageable", "-", pageable_round(data))]
        for mib in (int(c) for c in args.chunk_mib.split(",")):
            rows.append(("staged", mib, staged_round(data, mib << 20)))
            rows.append(("dma only", mib, dma_round(data, mib << 20)))
        for path, mib, (s, r) in rows:
            sg, rg = nbytes / s / 1e6, nbytes / r / 1e6
            print(f"| {tokens} | {nbytes >> 20} | {path} | {mib} | {s:.1f} | {sg:.1f} | "
                  f"{sg / link['D2H pinned']:.2f} | {r:.1f} | {rg:.1f} | "
                  f"{rg / link['H2D pinned']:.2f} | {nbytes / (s + r) / 1e6:.1f} |")
    ray.shutdown()


if __name__ == "__main__":
    main()

"""Pinned, chunked staging and the object-store transport between host and GPU: bit-exact."""

from __future__ import annotations

import asyncio

import pytest
import torch

from kvtransfer import KVPayload
from kvtransfer.pinned_staging import PinnedStaging

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _pages(layers: int = 7) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(0)
    # Large enough that the copy of a chunk overlaps the producer kernels if ordering is wrong.
    return torch.randn(layers, 64, 2, 16, 8, 128, device="cuda", generator=g).to(torch.bfloat16)


def test_to_host_is_ordered_after_the_producer_and_exact():
    src = _pages()
    per_layer = src[0].numel() * src.element_size()
    staging = PinnedStaging(chunk_bytes=2 * per_layer)
    for _ in range(2):  # the second pass reuses the pinned slots
        src.mul_(2)  # enqueued on the current stream just before the staged copies
        got, spans = torch.empty(src.shape, dtype=src.dtype), []

        def sink(l0: int, l1: int, h: torch.Tensor, got=got, spans=spans) -> None:
            spans.append((l0, l1))
            got[l0:l1].copy_(h)

        staging.to_host(src, sink)
        assert spans == [(0, 2), (2, 4), (4, 6), (6, 7)]
        assert torch.equal(got, src.cpu())


def test_to_device_completes_before_returning():
    host = _pages().cpu()
    per_layer = host[0].numel() * host.element_size()
    staging = PinnedStaging(chunk_bytes=3 * per_layer)
    out = torch.empty(host.shape, dtype=host.dtype, device="cuda")
    chunks = [(l0, l1, host[l0:l1]) for l0, l1 in staging.chunks(host.shape, host.dtype)]
    staging.to_device(chunks, out)
    with torch.cuda.stream(torch.cuda.Stream()):  # another stream reads without waiting
        assert torch.equal(out.cpu(), host)


def test_object_store_round_trip_on_gpu():
    ray = pytest.importorskip("ray")
    from kvtransfer.ray_object_store import RayObjectStoreTransport

    ray.init(include_dashboard=False, log_to_driver=False)  # joins RAY_ADDRESS if one is set
    try:
        data = _pages(5)
        transport = RayObjectStoreTransport(chunk_bytes=2 << 20)
        handle = transport.send(KVPayload.from_tensor(data, 16, 0, [1, 2], "fp"))
        got = asyncio.run(transport.receive(handle, "cuda"))
        assert got.data.is_cuda and torch.equal(got.data, data)
    finally:
        ray.shutdown()

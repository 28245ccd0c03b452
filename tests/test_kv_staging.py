"""KV chunking and staging on CPU (object-store round trip: tests/e2e; CUDA: tests/gpu)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from kvtransfer import KVPayload, make_transport
from kvtransfer.pinned_staging import PinnedStaging, layer_chunks


def test_layer_chunks_cover_whole_layers():
    assert layer_chunks(5, 100, 250) == [(0, 2), (2, 4), (4, 5)]
    assert layer_chunks(3, 100, 50) == [(0, 1), (1, 2), (2, 3)]  # a layer never splits
    assert layer_chunks(4, 100, 10_000) == [(0, 4)]


def test_staging_on_cpu_chunks_and_reassembles():
    staging = PinnedStaging(chunk_bytes=2 * 3 * 4 * 4)  # two layers of 3 x 4 float32
    src = torch.arange(5 * 3 * 4, dtype=torch.float32).view(5, 3, 4)
    seen = []
    staging.to_host(src, lambda l0, l1, host: seen.append((l0, l1, host.clone())))
    assert [(a, b) for a, b, _ in seen] == [(0, 2), (2, 4), (4, 5)]
    out = torch.empty_like(src)
    staging.to_device(seen, out)
    assert torch.equal(out, src)


def test_header_keeps_shape_and_dtype_only():
    data = torch.ones(2, 3, 2, 4, 1, 8, dtype=torch.bfloat16)
    p = KVPayload.from_tensor(data, 4, 1, [5, 6], "fp")
    h = p.header()
    assert h.data.device.type == "meta" and h.data.dtype == torch.bfloat16
    assert tuple(h.data.shape) == (2, 3, 2, 4, 1, 8)
    assert h.nbytes == p.nbytes == 2 * 3 * 2 * 4 * 8 * 2
    assert (h.first_block, h.block_hashes, h.fingerprint) == (1, [5, 6], "fp")


def test_inline_transport_places_data_on_the_device():
    data = torch.randn(2, 1, 2, 4, 1, 8)
    t = make_transport("inline")
    got = asyncio.run(t.receive(t.send(KVPayload.from_tensor(data, 4, 0, [], "f")), "cpu"))
    assert torch.equal(got.data, data)
    with pytest.raises(TypeError):
        asyncio.run(t.receive(object(), "cpu"))

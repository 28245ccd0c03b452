"""The object-store transport on a live Ray: chunked sends arrive bit-exact, in any dtype."""

from __future__ import annotations

import asyncio
import pickle

import pytest
import torch

from kvtransfer import KVPayload
from kvtransfer.ray_object_store import RayObjectStoreTransport


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_chunks_round_trip(cluster, dtype):
    torch.manual_seed(0)
    data = torch.randn(5, 3, 2, 4, 2, 8).to(dtype)  # 5 layers of 3 pages
    per_layer = data[0].numel() * data.element_size()
    transport = RayObjectStoreTransport(chunk_bytes=2 * per_layer)
    handle = transport.send(KVPayload.from_tensor(data, 4, 2, [11, 12, 13, 14, 15], "fp"))
    (h,) = handle
    assert [(l0, l1) for l0, l1, _ in h.chunks] == [(0, 2), (2, 4), (4, 5)]
    handle = pickle.loads(pickle.dumps(handle))  # it travels inside the prefill response
    got = asyncio.run(transport.receive(handle, "cpu"))
    assert got.data.dtype == dtype and torch.equal(got.data, data)
    assert (got.page_size, got.first_block, got.block_hashes, got.fingerprint) == \
        (4, 2, [11, 12, 13, 14, 15], "fp")


def test_receive_rejects_foreign_handles(cluster):
    with pytest.raises(TypeError):
        asyncio.run(RayObjectStoreTransport().receive([object()], "cpu"))

"""The KV channel protocol over gloo (the code `nccl` runs on GPUs), on CPU: payloads arrive
byte-exact in chunks of whole layers; two senders and two receivers cross-talk over one channel
per pair, made once and reused; a payload nobody fetches is dropped after the timeout; a sender or a
receiver that dies mid-transfer ends the transfer with KVTransferLost on the receiving side and
leaves the other side serving new pairs. Peers that die run in their own process."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import time

import pytest
import torch

from kvtransfer import KVPayload, KVTransferLost, make_transport
from kvtransfer.channel_transport import ChannelHandle, GlooTransport

L, P, PAGE, HKV, D = 4, 3, 16, 2, 8
LAYER_BYTES = P * 2 * PAGE * HKV * D * 4  # float32


def payload(seed: int, first_block: int = 0, num_layers: int = L) -> KVPayload:
    g = torch.Generator().manual_seed(seed)
    data = torch.randn(num_layers, P, 2, PAGE, HKV, D, generator=g)
    hashes = [seed * 100 + i for i in range(first_block + P)]
    return KVPayload.from_tensor(data, PAGE, first_block, hashes, f"fp{seed}")


def until(cond, what: str, limit_s: float = 60.0) -> None:
    """Waits for `cond`; the limit only guards against a hang."""
    end = time.monotonic() + limit_s
    while not cond():
        assert time.monotonic() < end, f"never happened: {what}"
        time.sleep(0.01)


@pytest.fixture
def transports():
    made: list[GlooTransport] = []

    def make(**kw) -> GlooTransport:
        t = GlooTransport(host="127.0.0.1", **kw)
        made.append(t)
        return t

    yield make
    for t in made:
        t.close()


def test_registry_names_the_channel_transports():
    t = make_transport("gloo", timeout_s=7)
    assert isinstance(t, GlooTransport) and t.timeout_s == 7
    t.close()
    with pytest.raises(ValueError, match="valid: .*'gloo'.*'nccl'"):
        make_transport("rdma")


def test_payload_arrives_exact_in_layer_chunks(transports):
    sender = transports(chunk_bytes=LAYER_BYTES)  # one layer per chunk
    receiver = transports()
    p = payload(1, first_block=2)
    handle = sender.send(p)
    assert isinstance(handle, ChannelHandle) and handle.spans == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert handle.header.data.device.type == "meta"  # the handle carries no bytes
    got = asyncio.run(receiver.receive(handle, "cpu"))
    assert torch.equal(got.data, p.data)
    assert (got.first_block, got.block_hashes, got.fingerprint, got.dtype) == \
        (2, p.block_hashes, "fp1", "float32")
    assert receiver.receiver.bytes_received == p.nbytes
    assert sender.sender.num_offers == 0 and sender.sender.transfers_sent == 1
    # the same pair carries the next payload: no second channel
    got = asyncio.run(receiver.receive(sender.send(payload(2)), "cpu"))
    assert torch.equal(got.data, payload(2).data)
    assert sender.sender.num_pairs == 1 and receiver.receiver.num_channels == 1


def test_two_prefill_two_decode_cross_talk(transports):
    senders = [transports(chunk_bytes=2 * LAYER_BYTES) for _ in range(2)]
    receivers = [transports() for _ in range(2)]

    async def round_(base: int) -> None:
        jobs, want = [], []
        for k in range(8):  # every (sender, receiver) pair twice, all at once
            s, r = senders[k % 2], receivers[(k // 2) % 2]
            p = payload(base + k)
            want.append(p.data)
            jobs.append(r.receive(s.send(p), "cpu"))
        got = await asyncio.gather(*jobs)
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g.data, w)

    asyncio.run(round_(10))
    asyncio.run(round_(20))
    # Channels are kept and reused: at most one per fetch that ran at once on a pair (two
    # here), at least one per pair; both ends count the same channels.
    assert all(2 <= r.receiver.num_channels <= 4 for r in receivers)
    assert sum(s.sender.num_pairs for s in senders) == \
        sum(r.receiver.num_channels for r in receivers)
    assert [s.sender.transfers_sent for s in senders] == [8, 8]
    assert all(s.sender.num_offers == 0 for s in senders)


def test_unfetched_payload_is_dropped_after_the_timeout(transports):
    sender = transports(timeout_s=0.3)
    receiver = transports(timeout_s=30)
    handle = sender.send(payload(3))
    assert sender.sender.num_offers == 1
    until(lambda: sender.sender.num_offers == 0, "the payload expired")
    assert sender.sender.transfers_dropped == 1
    with pytest.raises(KVTransferLost, match="not held by its sender"):
        asyncio.run(receiver.receive(handle, "cpu"))
    # the channel is fine: only that payload was missing
    sender.timeout_s = sender.sender.timeout_s = 30
    got = asyncio.run(receiver.receive(sender.send(payload(4)), "cpu"))
    assert torch.equal(got.data, payload(4).data) and receiver.receiver.num_channels == 1


def test_a_discarded_payload_is_let_go_at_once(transports):
    """A handle that never left the sender (its prefill's caller went away while it was sent)
    is discarded there: the payload is not held until the timeout."""
    sender = transports(timeout_s=30)
    kept, dropped = sender.send(payload(6)), sender.send(payload(7))
    assert sender.sender.num_offers == 2
    sender.discard(dropped)
    assert sender.sender.num_offers == 1 and sender.sender.transfers_dropped == 1
    sender.discard(dropped)  # nothing held under it any more: nothing changes
    assert sender.sender.num_offers == 1 and sender.sender.transfers_dropped == 1
    got = asyncio.run(transports().receive(kept, "cpu"))
    assert torch.equal(got.data, payload(6).data) and sender.sender.num_offers == 0


def test_unknown_sender_is_a_lost_transfer(transports):
    sender = transports()
    handle = sender.send(payload(5))
    sender.close()  # the prefill replica is gone, its store with it
    with pytest.raises(KVTransferLost):
        asyncio.run(transports(timeout_s=5).receive(handle, "cpu"))


# -- peers in their own processes, dying mid-transfer -----------------------------------------

def _die_after(method: str, n: int) -> None:
    """Patches PairChannel.`method` (send or recv) so that this process dies right after its
    n-th call: the header, the first span's status and its layer are n = 3."""
    from kvtransfer.pair_channel import PairChannel

    calls = {"n": 0}
    original = getattr(PairChannel, method)

    def once(self, tensor, deadline):
        original(self, tensor, deadline)
        calls["n"] += 1
        if calls["n"] == n:
            os._exit(3)

    setattr(PairChannel, method, once)


def _dying_sender(q) -> None:
    t = GlooTransport(host="127.0.0.1", chunk_bytes=LAYER_BYTES)
    _die_after("send", 3)
    q.put(t.send(payload(6)))
    time.sleep(600)  # dies in its pair thread before this ends


def _dying_receiver(handle) -> None:
    _die_after("recv", 3)
    asyncio.run(GlooTransport(host="127.0.0.1").receive(handle, "cpu"))


def test_sender_dying_mid_transfer(transports):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_dying_sender, args=(q,))
    proc.start()
    try:
        handle = q.get(timeout=120)
        receiver = transports(timeout_s=60)
        with pytest.raises(KVTransferLost):
            asyncio.run(receiver.receive(handle, "cpu"))
        proc.join(60)
        assert proc.exitcode == 3  # it died where the test said, not elsewhere
        assert receiver.receiver.num_channels == 0  # the broken channel was dropped
        assert 0 < receiver.receiver.bytes_received < payload(6).nbytes
        # a live sender pairs with the same receiver afterwards
        got = asyncio.run(receiver.receive(transports().send(payload(7)), "cpu"))
        assert torch.equal(got.data, payload(7).data)
    finally:
        proc.kill()


def test_receiver_dying_mid_transfer(transports):
    sender = transports(chunk_bytes=LAYER_BYTES, timeout_s=60)
    handle = sender.send(payload(8))
    proc = mp.get_context("spawn").Process(target=_dying_receiver, args=(handle,))
    proc.start()
    proc.join(120)
    assert proc.exitcode == 3
    # the sender's pair ends, the payload left with it (its receiver is gone), nothing held
    until(lambda: sender.sender.num_pairs == 0, "the sender dropped the broken pair")
    assert sender.sender.num_offers == 0 and sender.sender.transfers_sent == 0
    got = asyncio.run(transports().receive(sender.send(payload(9)), "cpu"))
    assert torch.equal(got.data, payload(9).data)

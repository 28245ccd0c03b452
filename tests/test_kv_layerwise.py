"""Layer-wise KV streaming: the engine publishes each layer's pages of a prompt during the step
that completes it, and the channel transport sends them while later layers still run.

- the streamed export equals the whole-payload export (chunked prompts and prefix offsets too);
- with the last layer held, the receiver already has every earlier layer (overlap, shown
  without any timing);
- prefill + decode over gloo channels give the colocated engine's tokens, streamed or not;
- a prefill aborted mid-stream ends the receive with KVTransferLost, nothing held or leaked;
- so does one whose decode replica went away (its socket closed), with no receiver at all.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from decode.deployment import PrefillClient
from decode.worker import DecodeWorker
from engine.async_engine import AsyncEngine
from engine.config import EngineConfig, ModelConfig
from engine.kv_stream import LayerwiseExport
from engine.llm import LLM
from engine.llm_engine import Engine
from engine.sampling_params import SamplingParams
from kvtransfer import KVTransferLost, make_transport, model_fingerprint
from prefill.worker import PrefillWorker
from tests.test_prefill_batch import CallingReplica

ONE = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def until(cond, what: str, limit_s: float = 60.0) -> None:
    end = time.monotonic() + limit_s  # a hang guard, not a speed bound
    while not cond():
        assert time.monotonic() < end, f"never happened: {what}"
        time.sleep(0.005)


def engine(path: str, **kw) -> Engine:
    return Engine(ModelConfig(path), EngineConfig(page_size=16, num_pages=64, **kw))


class LastLayerGate:
    """Holds a prefill engine's forward inside its last layer: `held` is set once a step got
    there, and the step goes on after `release`."""

    def __init__(self, prefill: PrefillWorker) -> None:
        last = prefill.engine.engine.runner.model.layers[-1]
        self.held, self.release = threading.Event(), threading.Event()
        forward = last.forward

        def held_forward(*args, **kw):
            self.held.set()
            assert self.release.wait(60)
            return forward(*args, **kw)

        last.forward = held_forward


def prefill_worker(path: str, transport) -> PrefillWorker:
    fp = model_fingerprint(path, "float32", "safetensors", 0)
    return PrefillWorker(AsyncEngine(engine(path)), transport, fp)


def finished(outs: list) -> object:
    (out,) = [o for o in outs if o.finished]
    return out


def run(e: Engine) -> object:
    """The finishing output of the one request queued on `e`."""
    outs = []
    while e.has_unfinished():
        outs += e.step()
    return finished(outs)


@pytest.mark.parametrize("first_block,budget", [(0, 512), (2, 512), (0, 32)])
def test_streamed_export_equals_whole_export(tiny_llama, first_block, budget):
    prompt = [(7 * i) % 1900 + 5 for i in range(100)]  # 7 pages; budget 32: 4 prompt steps
    whole = engine(tiny_llama, max_num_batched_tokens=budget)
    whole.add_request(prompt, ONE, "w", kv_export_from=first_block)
    streamed = engine(tiny_llama, max_num_batched_tokens=budget)
    export = LayerwiseExport(first_block, 7 - first_block)
    streamed.add_request(prompt, ONE, "s", kv_export_from=first_block, kv_stream=export)
    published, outs = [], []
    while streamed.has_unfinished():
        before = export.layers_ready
        outs += streamed.step()
        published.append(export.layers_ready - before)
    s, w = finished(outs), run(whole)
    num_layers = len(streamed.pool.layers)
    assert published[-1] == num_layers and sum(published) == num_layers  # all in the last step
    assert s.kv.data is export.data and torch.equal(s.kv.data, w.kv.data)
    assert s.new_token_ids == w.new_token_ids
    for e in (whole, streamed):
        e.check_integrity()
        assert e.num_pages_used == 0


def test_layers_leave_while_the_prefill_runs(tiny_llama):
    """The last layer is held inside the forward: the receiver has every layer before it."""
    sender = make_transport("gloo", timeout_s=60)
    sender.chunk_bytes = 1  # one layer per chunk
    receiver = make_transport("gloo", timeout_s=60)
    prefill = prefill_worker(tiny_llama, sender)
    model = prefill.engine.engine.runner.model
    gate = LastLayerGate(prefill)
    prompt = list(range(30, 90))

    async def main():
        stream = prefill.prefill_stream(prompt, ONE, "p")
        handle = await anext(stream)
        receive = asyncio.ensure_future(receiver.receive(handle, "cpu"))
        nxt = asyncio.ensure_future(anext(stream))
        await asyncio.to_thread(gate.held.wait, 60)
        layer_bytes = handle.header.data[0].numel() * 4
        n = len(model.layers)
        await asyncio.to_thread(until, lambda: receiver.receiver.bytes_received
                                == (n - 1) * layer_bytes, "the first layers arrived")
        assert not receive.done()  # the last layer is still being computed
        gate.release.set()
        result, payload = await nxt, await receive
        await stream.aclose()
        return result, payload

    try:
        result, payload = asyncio.run(main())
    finally:
        gate.release.set()
        sender.close()
        receiver.close()
    ref = engine(tiny_llama)
    ref.add_request(prompt, ONE, "r", kv_export_from=0)
    out = run(ref)
    assert torch.equal(payload.data, out.kv.data)
    assert result.first_token == out.new_token_ids[0] and result.kv is None


def test_a_held_layerwise_transfer_does_not_block_the_next(tiny_llama):
    """A long prefill's layer-wise fetch holds its channel until its last layer: a second
    transfer from the same sender to the same receiver goes over a second channel meanwhile."""
    sender = make_transport("gloo", timeout_s=60)
    receiver = make_transport("gloo", timeout_s=60)
    prefill = prefill_worker(tiny_llama, sender)
    gate = LastLayerGate(prefill)
    ready = payload_of(tiny_llama)

    async def main():
        stream = prefill.prefill_stream(list(range(30, 90)), ONE, "long")
        slow = asyncio.ensure_future(receiver.receive(await anext(stream), "cpu"))
        nxt = asyncio.ensure_future(anext(stream))
        await asyncio.to_thread(gate.held.wait, 60)
        got = await receiver.receive(sender.send(ready), "cpu")  # while "long" is held
        assert not slow.done() and torch.equal(got.data, ready.data)
        assert receiver.receiver.num_channels == 2
        gate.release.set()
        await nxt
        await slow
        await stream.aclose()
        assert sender.sender.num_pairs == 2 and sender.sender.num_offers == 0

    try:
        asyncio.run(main())
    finally:
        gate.release.set()
        sender.close()
        receiver.close()


def payload_of(path: str):
    """A finished whole-payload export of a short prompt, to send as is."""
    from kvtransfer import KVPayload

    e = engine(path)
    e.add_request(list(range(200, 240)), ONE, "x", kv_export_from=0)
    out = run(e)
    return KVPayload.from_tensor(out.kv.data, 16, 0, out.kv.block_hashes, "fp")


@pytest.mark.parametrize("layerwise", [True, False])
def test_disaggregated_over_gloo_equals_colocated(tiny_llama, layerwise):
    fp = model_fingerprint(tiny_llama, "float32", "safetensors", 0)
    send, recv = make_transport("gloo", timeout_s=60), make_transport("gloo", timeout_s=60)
    prefill = PrefillWorker(AsyncEngine(engine(tiny_llama)), send, fp)
    decode = DecodeWorker(AsyncEngine(engine(tiny_llama)), prefill, recv, fp, timeout_s=60,
                          layerwise=layerwise)
    shared = list(range(100, 164))
    prompts = [shared + [7, 8, 9], shared + [10, 11], list(range(500, 540))]

    async def main():
        return await asyncio.gather(*(
            _tokens(decode, p, f"r{i}") for i, p in enumerate(prompts)))

    try:
        got = asyncio.run(main())
    finally:
        send.close()
        recv.close()
    ref = LLM(tiny_llama, num_pages=128).generate(prompts, GREEDY)
    assert got == [c.token_ids for c in ref]
    assert send.sender.num_offers == 0
    for w in (prefill, decode):
        w.engine.engine.check_integrity()
        assert w.engine.stats().pages_used == 0


@pytest.mark.parametrize("layerwise", [True, False])
def test_a_prompt_cached_whole_on_the_decode_side_crosses_no_pages(tiny_llama, layerwise):
    """The same prompt of whole blocks twice: the second time every block is cached where it
    decodes, so the channel carries a transfer of no pages (as a resume can make)."""
    fp = model_fingerprint(tiny_llama, "float32", "safetensors", 0)
    send, recv = make_transport("gloo", timeout_s=60), make_transport("gloo", timeout_s=60)
    prefill = PrefillWorker(AsyncEngine(engine(tiny_llama)), send, fp)
    decode = DecodeWorker(AsyncEngine(engine(tiny_llama)), prefill, recv, fp, timeout_s=60,
                          layerwise=layerwise)
    prompt = list(range(200, 264))  # exactly 4 full blocks

    async def main():
        return [await _tokens(decode, prompt, f"r{i}") for i in range(2)]

    try:
        got = asyncio.run(main())
    finally:
        send.close()
        recv.close()
    ref = LLM(tiny_llama, num_pages=128).generate([prompt], GREEDY)[0].token_ids
    assert got == [ref, ref]
    assert decode.metrics.counters["pdserve_kv_transfer_blocks_skipped_total"] == 4
    for w in (prefill, decode):
        w.engine.engine.check_integrity()
        assert w.engine.stats().pages_used == 0


async def _tokens(decode: DecodeWorker, prompt: list[int], rid: str) -> list[int]:
    return [t async for out in decode.generate(prompt, GREEDY, rid) for t in out.new_token_ids]


def test_prefill_aborted_mid_stream(tiny_llama):
    send, recv = make_transport("gloo", timeout_s=60), make_transport("gloo", timeout_s=60)
    send.chunk_bytes = 1
    prefill = prefill_worker(tiny_llama, send)
    gate = LastLayerGate(prefill)

    async def main():
        stream = prefill.prefill_stream(list(range(40, 100)), ONE, "gone")
        handle = await anext(stream)
        receive = asyncio.ensure_future(recv.receive(handle, "cpu"))
        nxt = asyncio.ensure_future(anext(stream))
        await asyncio.to_thread(gate.held.wait, 60)
        prefill.engine.abort("gone")  # the decode side's client went away
        with pytest.raises(RuntimeError, match="ended without a token"):
            await nxt  # ends at once, while the last layer is still held
        with pytest.raises(KVTransferLost, match="ended by its sender"):
            await receive
        gate.release.set()
        await prefill.engine.check_integrity()

    try:
        asyncio.run(main())
        assert recv.receiver.num_channels == 1  # the channel survived the failed transfer
        assert send.sender.num_offers == 0 and send.sender.transfers_sent == 0
        assert prefill.engine.stats().pages_used == 0
    finally:
        gate.release.set()
        send.close()
        recv.close()


class StreamHandle:
    """The prefill deployment's handle for layer-streamed calls: `prefill_stream` runs the
    worker's stream inside `Replica.stream_one` on a stand-in replica, as the prefill
    deployment does given the caller's address."""

    def __init__(self, worker: PrefillWorker) -> None:
        self.replica, self.worker = CallingReplica(), worker
        self.replica.engine = worker.engine  # a lost socket's requests are aborted on it
        self.prefill_stream = self

    def options(self, stream: bool) -> StreamHandle:
        assert stream
        return self

    def remote(self, *args, address) -> StreamResponse:
        return StreamResponse(self.replica.stream_one(
            address, args[2], lambda: self.worker.prefill_stream(*args)))


class StreamResponse:
    """A streaming DeploymentResponseGenerator stand-in: its items, and `cancel()`."""

    def __init__(self, items) -> None:
        self.items = items

    def __anext__(self):
        return self.items.__anext__()

    def cancel(self) -> None:
        asyncio.ensure_future(self.items.aclose())


def test_a_decode_replica_that_goes_away_mid_stream_has_its_prompt_aborted(tiny_llama):
    """The decode replica's socket closes (as when its process dies) while the prefill replica
    runs its layer-streamed prompt: the prompt is aborted there and the prefill holds no page;
    nobody is left to fetch the failed stream, so the sender drops its buffer at the next
    sweep instead of holding it to its deadline."""
    send = make_transport("gloo", timeout_s=600)  # its deadline far past the hang guard's
    prefill = prefill_worker(tiny_llama, send)
    gate = LastLayerGate(prefill)

    async def main():
        client = PrefillClient(StreamHandle(prefill), timeout_s=60)
        stream = client.prefill_stream(list(range(40, 100)), ONE, "orphan")
        await anext(stream)  # the KV handle
        nxt = asyncio.ensure_future(anext(stream))
        await asyncio.to_thread(gate.held.wait, 60)
        client.close()  # the decode replica goes: its socket closes, no abort is sent
        with pytest.raises(RuntimeError, match="prefill of orphan ended without a token"):
            await nxt  # ends while the last layer is still held (here its stream reaches us)
        gate.release.set()
        await prefill.engine.check_integrity()

    try:
        asyncio.run(main())
        assert "pdserve_prompt_tokens_total" not in prefill.metrics.counters  # it never ended
        assert prefill.engine.stats().pages_used == 0
        # the failed stream's buffer is dropped by the sender's sweep, not at its deadline
        until(lambda: send.sender.num_offers == 0, "the failed stream's offer dropped")
        assert (send.sender.transfers_sent, send.sender.transfers_dropped) == (0, 1)
    finally:
        gate.release.set()
        send.close()

"""fp8 KV pages on CPU (the torch backend's reference path): the pool halves, writes saturate
and reads upcast (attention over fp8 pages is attention over the fp8-rounded K/V), an engine
with fp8 KV stays close to one without, fp8 payloads cross the inline and gloo transports and
pickling byte-exact, and a replica refuses KV of another dtype naming both."""

from __future__ import annotations

import asyncio
import pickle

import numpy as np
import pytest
import torch

from decode.worker import DecodeWorker
from engine.async_engine import AsyncEngine
from engine.attention.metadata import build_metadata
from engine.attention.torch_backend import TorchBackend
from engine.config import EngineConfig, ModelConfig
from engine.kv_pool import KVPool
from engine.llm import LLM
from engine.llm_engine import Engine
from engine.model_arch import ModelArch
from engine.sampling_params import SamplingParams
from kvtransfer import KVPayload, make_transport, model_fingerprint
from kvtransfer.channel_transport import GlooTransport
from kvtransfer.ray_object_store import _as_tensor
from prefill.worker import PrefillWorker
from tests.test_fp8 import agreement, prompts

FP8 = torch.float8_e4m3fn
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def fp8_payload(seed: int = 0) -> KVPayload:
    g = torch.Generator().manual_seed(seed)
    data = (torch.randn(4, 3, 2, 16, 2, 8, generator=g) * 4).to(FP8)
    return KVPayload.from_tensor(data, 16, 0, [1, 2, 3], "fp")


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_fp8_pages_take_half_the_bytes_of_bf16_and_double_the_auto_sized_pool(tiny_llama):
    arch = ModelArch.from_pretrained(tiny_llama)
    bf16 = KVPool.bytes_per_page(arch, 16, torch.bfloat16)
    assert KVPool.bytes_per_page(arch, 16, FP8) * 2 == bf16
    kw = dict(dtype="bfloat16", kv_memory_gb=0.01)
    plain, fp8 = LLM(tiny_llama, **kw), LLM(tiny_llama, kv_cache_dtype="fp8_e4m3", **kw)
    assert fp8.engine.pool.kv.dtype == FP8
    assert fp8.engine.pool.num_pages == 2 * plain.engine.pool.num_pages
    # the same bytes for the allocator's pages (each pool has one scratch page more)
    assert fp8.engine.pool.kv[:, :-1].nbytes == plain.engine.pool.kv[:, :-1].nbytes


def test_attention_over_fp8_pages_is_attention_over_fp8_rounded_kv():
    hq, hkv, d, ps = 4, 2, 16, 4
    backend = TorchBackend(num_q_heads=hq, num_kv_heads=hkv, head_dim=d, dtype=torch.float32,
                           device="cpu", page_size=ps, kv_dtype=FP8)
    # one request prefilling 6 tokens after 5 cached ones, two decoding one token each
    meta = build_metadata([[0, 1, 2], [3, 4], [5]], [5, 6, 2], [6, 1, 1], ps, "cpu")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(8, hq, d, generator=g)
    k, v = (torch.randn(8, hkv, d, generator=g) * 3 for _ in range(2))
    k[0, 0, 0] = 1000.0  # past e4m3's range: saturates to 448, never NaN
    cache = (torch.randn(6, 2, ps, hkv, d, generator=g) * 3).to(FP8)
    ref_cache = cache.float()
    out = backend.plan(meta).forward(0, q, k, v, cache)
    rounded = [x.clamp(-448, 448).to(FP8).float() for x in (k, v)]
    ref = TorchBackend(num_q_heads=hq, num_kv_heads=hkv, head_dim=d, dtype=torch.float32,
                       device="cpu", page_size=ps).plan(meta).forward(0, q, *rounded, ref_cache)
    assert torch.equal(cache.float(), ref_cache)  # the same values were written
    assert cache.float().abs().max() == 448.0 and not cache.float().isnan().any()
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_a_backend_refuses_kv_of_a_third_dtype():
    with pytest.raises(ValueError, match="the pool holds the model's dtype or"):
        TorchBackend(num_q_heads=2, num_kv_heads=2, head_dim=8, dtype=torch.float32,
                     device="cpu", kv_dtype=torch.bfloat16)


def test_an_engine_with_fp8_kv_stays_close_to_full_precision_kv(tiny_llama):
    # Measured on the tiny model (which amplifies errors, tests/test_fp8.py): KL 0.10, top-1
    # 0.84; pages written wrongly (another dtype's bytes, a lost scale) give garbage.
    ref = LLM(tiny_llama, num_pages=64)
    fp8 = LLM(tiny_llama, num_pages=64, kv_cache_dtype="fp8_e4m3")
    kl, top1 = agreement(ref, fp8, prompts())
    assert kl < 0.3 and top1 > 0.75
    out = fp8.generate(prompts(4, 30), GREEDY)
    assert all(len(o.token_ids) == GREEDY.max_tokens for o in out)
    both = LLM(tiny_llama, num_pages=64, kv_cache_dtype="fp8_e4m3", quantize="fp8")
    assert both.engine.pool.kv.dtype == FP8
    assert len(both.generate(prompts(1, 30), GREEDY)[0].token_ids) == GREEDY.max_tokens


# -- payloads and transports -----------------------------------------------------------------
def test_an_fp8_payload_pickles_byte_exact_and_its_header_keeps_the_dtype():
    p = fp8_payload()
    assert p.dtype == "float8_e4m3fn" and p.nbytes == 4 * 3 * 2 * 16 * 2 * 8
    back = pickle.loads(pickle.dumps(p))  # plain pickle: what Ray and Serve use
    assert same_bytes(back.data, p.data) and back.block_hashes == [1, 2, 3]
    header = pickle.loads(pickle.dumps(p.header()))
    assert header.data.device.type == "meta" and header.data.dtype == FP8


def test_a_payload_of_another_kv_dtype_is_refused_naming_both():
    kw = dict(page_size=16, first_block=0, block_hashes=[1, 2, 3], num_pages=3, fingerprint="fp")
    fp8_payload().check(dtype=FP8, **kw)
    with pytest.raises(ValueError, match="KV dtype float8_e4m3fn sent, the receiving pool holds "
                                         "bfloat16 .*same engine.kv_cache_dtype"):
        fp8_payload().check(dtype=torch.bfloat16, **kw)


def test_fp8_pages_cross_the_inline_transport():
    t = make_transport("inline")
    p = fp8_payload(1)
    got = asyncio.run(t.receive(t.send(p), "cpu"))
    assert same_bytes(got.data, p.data)


def test_fp8_pages_cross_the_gloo_channel_byte_exact():
    sender, receiver = GlooTransport(host="127.0.0.1"), GlooTransport(host="127.0.0.1")
    try:
        p = fp8_payload(2)
        got = asyncio.run(receiver.receive(sender.send(p), "cpu"))
        assert same_bytes(got.data, p.data) and got.dtype == "float8_e4m3fn"
    finally:
        sender.close()
        receiver.close()


def test_object_store_chunks_view_back_as_fp8():
    # what RayObjectStoreTransport does with each chunk's bytes (the Ray round trip: tests/e2e)
    p = fp8_payload(3)
    raw = p.data[1:3].reshape(-1).view(torch.uint8).numpy()
    got = _as_tensor(np.frombuffer(raw.tobytes(), dtype=np.uint8), FP8, (2, *p.data.shape[1:]))
    assert same_bytes(got, p.data[1:3])


# -- prefill and decode replicas -------------------------------------------------------------
def _pair(path: str, prefill_kv: str, decode_kv: str):
    fp = model_fingerprint(path, "float32", "safetensors", 0)
    transport = make_transport("inline")

    def engine(kv: str) -> AsyncEngine:
        cfg = EngineConfig(page_size=16, num_pages=128, kv_cache_dtype=kv)
        return AsyncEngine(Engine(ModelConfig(path), cfg))

    prefill = PrefillWorker(engine(prefill_kv), transport, fp)
    return prefill, DecodeWorker(engine(decode_kv), prefill, transport, fp)


async def _collect(decode: DecodeWorker, prompt: list[int]) -> list[int]:
    return [t async for out in decode.generate(prompt, GREEDY, "r") for t in out.new_token_ids]


@pytest.mark.parametrize("kv, page_bytes", [("auto", 4), ("fp8_e4m3", 1)])
def test_disaggregated_fp8_kv_moves_a_quarter_of_fp32_bytes_and_equals_colocated(
        tiny_llama, kv, page_bytes):
    prompt = list(range(100, 167))  # 5 pages
    prefill, decode = _pair(tiny_llama, kv, kv)
    tokens = asyncio.run(_collect(decode, prompt))
    ref = LLM(tiny_llama, num_pages=128, kv_cache_dtype=kv).generate([prompt], GREEDY)[0]
    assert tokens == ref.token_ids
    arch = decode.engine.engine.arch
    per_page = arch.num_layers * 2 * 16 * arch.num_kv_heads * arch.head_dim * page_bytes
    assert decode.metrics.counters["pdserve_kv_transfer_bytes_total"] == 5 * per_page


def test_a_decode_replica_refuses_kv_from_a_prefill_replica_of_another_kv_dtype(tiny_llama):
    prefill, decode = _pair(tiny_llama, "fp8_e4m3", "auto")
    with pytest.raises(ValueError, match="KV dtype float8_e4m3fn sent, the receiving pool "
                                         "holds float32"):
        asyncio.run(_collect(decode, list(range(100, 140))))


def test_a_layerwise_export_of_fp8_pages_equals_the_whole_export(tiny_llama):
    from engine.kv_stream import LayerwiseExport

    def engine() -> Engine:
        return Engine(ModelConfig(tiny_llama), EngineConfig(page_size=16, num_pages=64,
                                                            kv_cache_dtype="fp8_e4m3"))

    prompt = [(7 * i) % 1900 + 5 for i in range(100)]  # 7 pages
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    outs = {}
    for name, stream in (("whole", None), ("streamed", LayerwiseExport(0, 7))):
        e = engine()
        e.add_request(prompt, one, name, kv_export_from=0, kv_stream=stream)
        while e.has_unfinished():
            outs[name] = [o for o in e.step() if o.finished] or outs.get(name)
    whole, streamed = outs["whole"][0].kv.data, outs["streamed"][0].kv.data
    assert streamed.dtype == FP8 and same_bytes(streamed, whole)


def test_the_app_config_carries_fp8_to_the_engine_configs():
    from serving.config import AppConfig

    cfg = AppConfig.from_args({"model": {"quantize": "fp8"},
                               "engine": {"kv_cache_dtype": "fp8_e4m3"},
                               "prefill": {"engine": {"kv_cache_dtype": "auto"}}})
    assert cfg.model.to_config().quantize == "fp8"
    assert cfg.engine_config("decode").kv_cache_dtype == "fp8_e4m3"
    assert cfg.engine_config("prefill").kv_cache_dtype == "auto"  # allowed, refused at transfer
    assert cfg.engine_config("decode").kv_dtype_name("bfloat16") == "float8_e4m3fn"
    assert cfg.engine_config("prefill").kv_dtype_name("bfloat16") == "bfloat16"


def test_fp8_weights_and_kv_give_the_same_tokens_with_overlapped_scheduling(tiny_llama):
    kw = dict(num_pages=64, kv_cache_dtype="fp8_e4m3", quantize="fp8")
    p = prompts(3, 25)
    serial = LLM(tiny_llama, overlap_scheduling="off", **kw).generate(p, GREEDY)
    overlapped = LLM(tiny_llama, overlap_scheduling="on", **kw).generate(p, GREEDY)
    assert [o.token_ids for o in overlapped] == [o.token_ids for o in serial]

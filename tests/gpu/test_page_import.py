"""cuda_ipc's `receive_into` writes a prefill replica's pages straight into the decode pool's
reserved pages (engine/page_import.py): the right bytes land in the right pages and nowhere else,
never before the engine's stream has passed the reservation, and a payload that does not fit
writes nothing. End to end, a 1P1D pair across two processes gives the colocated engine's
tokens."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import pickle

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from engine.kv_pool import KVPool  # noqa: E402
from engine.model_arch import ModelArch  # noqa: E402
from engine.page_import import page_import  # noqa: E402
from kvtransfer import cuda_ipc  # noqa: E402
from kvtransfer.cuda_runtime import CudaRuntime, IpcMappings, cuda_runtime  # noqa: E402

pytestmark = pytest.mark.gpu

LAYERS, PAGE, HKV, D = 2, 16, 8, 128
ARCH = ModelArch("LlamaForCausalLM", 100, 64, 128, LAYERS, 8, HKV, D, 1e-5, 10000.0)


def _exporter(requests, replies) -> None:
    """A sender process: for each (num_pages, seed), a payload of random pages sent through
    cuda_ipc, answered with (handle, the pages on the host); the blocks are held until the end."""
    from kvtransfer.cuda_ipc import CudaIpcTransport
    from kvtransfer.payload import KVPayload

    transport, held = CudaIpcTransport(), []
    while (msg := requests.get()) is not None:
        num_pages, seed = msg
        torch.manual_seed(seed)
        data = torch.randn(LAYERS, num_pages, 2, PAGE, HKV, D, device="cuda",
                           dtype=torch.bfloat16)
        payload = KVPayload.from_tensor(data, PAGE, 1, [seed], "fp")
        held.append(payload)
        replies.put((transport.send(payload), data.cpu()))
    torch.cuda.ipc_collect()


@pytest.fixture(scope="module")
def exporter():
    ctx = mp.get_context("spawn")
    requests, replies = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_exporter, args=(requests, replies))
    proc.start()

    def export(num_pages: int, seed: int):
        requests.put((num_pages, seed))
        return replies.get(timeout=120)

    yield export
    requests.put(None)
    proc.join(60)
    assert proc.exitcode == 0


class _RowByRow(CudaRuntime):
    """The runtime of a device whose pitch limit is below the pool's: a copy per layer."""

    def max_pitch(self, device: int) -> int:
        return 0


@pytest.mark.parametrize("rows", [False, True], ids=["2d", "row-by-row"])
def test_pages_land_in_the_reserved_pages_only(exporter, monkeypatch, rows):
    if rows:
        monkeypatch.setattr(cuda_ipc, "cuda_runtime", lambda: _RowByRow(cuda_runtime().lib))
    pool = KVPool(ARCH, 12, PAGE, torch.bfloat16, "cuda")
    handle, sent = exporter(3, seed=1)
    target = page_import(pool, [7, 8, 2])  # two runs: 7-8, then 2
    transport = cuda_ipc.CudaIpcTransport()
    header = asyncio.run(transport.receive_into(handle, target))
    assert header.data.is_meta and tuple(header.data.shape) == target.shape
    assert header.first_block == 1 and header.block_hashes == [1]
    kv = pool.kv.cpu()
    assert torch.equal(kv[:, [7, 8, 2]], sent)
    untouched = [p for p in range(13) if p not in (2, 7, 8)]  # the scratch page (12) too
    assert kv[:, untouched].count_nonzero() == 0
    assert transport.mappings.in_use() == 0


def test_the_write_waits_for_the_steps_before_the_reservation(exporter):
    """A step launched before the pages were reserved may still write them (it ran for the
    request that held them): the transport's copy comes after it, whatever their timing."""
    pool = KVPool(ARCH, 8, PAGE, torch.bfloat16, "cuda")
    handle, sent = exporter(1, seed=2)
    torch.cuda._sleep(200_000_000)  # ~0.1-0.2 s of GPU time before the "step's" write
    pool.kv[:, 5].fill_(7.0)  # the old owner's step writes page 5
    target = page_import(pool, [5])
    asyncio.run(cuda_ipc.CudaIpcTransport().receive_into(handle, target))
    torch.cuda.synchronize()
    assert torch.equal(pool.kv[:, 5].cpu(), sent[:, 0])


def test_a_payload_that_does_not_fit_writes_nothing(exporter):
    pool = KVPool(ARCH, 8, PAGE, torch.bfloat16, "cuda")
    handle, _ = exporter(3, seed=3)
    target = page_import(pool, [1, 2])  # two pages reserved, three sent
    transport = cuda_ipc.CudaIpcTransport()
    with pytest.raises(ValueError, match="does not fit"):
        asyncio.run(transport.receive_into(handle, target))
    assert pool.kv.count_nonzero().item() == 0
    assert transport.mappings.in_use() == 0


def test_a_mapping_serves_the_next_payloads_until_the_sweep_unmaps_it(exporter):
    """Payloads in one sender allocation share one mapping, kept once they are written (no map
    and unmap per payload), and unmapped by the sweep once unused for `linger_s`."""
    clock = [0.0]
    transport = cuda_ipc.CudaIpcTransport()
    transport.mappings = maps = IpcMappings(linger_s=10.0, clock=lambda: clock[0],
                                            sweep_thread=False)
    pool = KVPool(ARCH, 8, PAGE, torch.bfloat16, "cuda")
    sent = []
    for seed, pages in ((11, [1]), (12, [2]), (13, [3])):
        handle, data = exporter(1, seed=seed)
        asyncio.run(transport.receive_into(handle, page_import(pool, pages)))
        sent.append((handle, data))
    allocations = {pickle.loads(handle)[1].handle for handle, _ in sent}
    assert len(allocations) < 3  # torch's allocator packs small blocks into one segment
    assert (len(maps), maps.in_use()) == (len(allocations), 0)
    clock[0] = 10.0
    assert maps.sweep() == len(allocations) and len(maps) == 0
    last = exporter(1, seed=14)  # mapped afresh
    asyncio.run(transport.receive_into(last[0], page_import(pool, [4])))
    kv = pool.kv.cpu()
    for page, (_, data) in zip([1, 2, 3, 4], [*sent, last], strict=True):
        assert torch.equal(kv[:, page], data[:, 0])


def _prefill_server(path: str, requests, replies) -> None:
    """A prefill replica in a process of its own: PrefillWorker over cuda_ipc."""
    from engine.async_engine import AsyncEngine
    from engine.config import EngineConfig, ModelConfig
    from engine.llm_engine import Engine
    from kvtransfer import model_fingerprint
    from kvtransfer.cuda_ipc import CudaIpcTransport
    from prefill.worker import PrefillWorker

    async def serve() -> None:
        engine = Engine(ModelConfig(path, dtype="bfloat16", device="cuda"),
                        EngineConfig(**ENGINE_KW))
        fp = model_fingerprint(path, "bfloat16", "safetensors", 0)
        worker = PrefillWorker(AsyncEngine(engine), CudaIpcTransport(), fp)
        while (msg := await asyncio.to_thread(requests.get)) is not None:
            replies.put(await worker.prefill(*msg))

    asyncio.run(serve())


ENGINE_KW = dict(page_size=PAGE, num_pages=256, max_num_seqs=8, attention_backend="flashinfer")


@pytest.mark.parametrize("local_prefill_max_tokens", [0, 8])
def test_1p1d_across_processes_gives_the_colocated_tokens(tmp_path, local_prefill_max_tokens):
    """With a limit of 8, the second prompt (4 cached pages + 5 tokens) is prefilled by the
    decode engine itself, on the pages the first one imported."""
    pytest.importorskip("flashinfer")
    import engine.tiny_model as tiny
    from decode.worker import DecodeWorker
    from engine.async_engine import AsyncEngine
    from engine.config import EngineConfig, ModelConfig
    from engine.llm import LLM
    from engine.llm_engine import Engine
    from engine.sampling_params import SamplingParams
    from kvtransfer import model_fingerprint

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tiny, "HEAD_DIM", 64)  # FlashInfer has no 32-wide kernels
        path = str(tiny.make_tiny_model(tmp_path / "tiny-llama"))
    greedy = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    shared = list(range(300, 364))  # 4 full pages: the second prompt finds them cached
    prompts = [shared + [5, 6, 7], shared + [9, 10, 11, 12, 13]]
    ref = LLM(path, dtype="bfloat16", device="cuda", **ENGINE_KW).generate(prompts, greedy)

    ctx = mp.get_context("spawn")
    requests, replies = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_prefill_server, args=(path, requests, replies))
    proc.start()

    class Remote:  # the Prefiller protocol over the two queues
        async def prefill(self, prompt_ids, params, request_id, first_block=0):
            requests.put((prompt_ids, params, request_id, first_block))
            return await asyncio.to_thread(replies.get, timeout=300)

    async def main():
        engine = AsyncEngine(Engine(ModelConfig(path, dtype="bfloat16", device="cuda"),
                                    EngineConfig(**ENGINE_KW)))
        fp = model_fingerprint(path, "bfloat16", "safetensors", 0)
        decode = DecodeWorker(engine, Remote(), cuda_ipc.CudaIpcTransport(), fp,
                              local_prefill_max_tokens=local_prefill_max_tokens)
        outs = []
        for i, prompt in enumerate(prompts):  # one after the other: the prefix is cached
            outs.append([t async for o in decode.generate(prompt, greedy, f"r{i}")
                         for t in o.new_token_ids])
        await engine.check_integrity()
        return outs, decode.metrics.counters, engine.stats()

    try:
        outs, counters, stats = asyncio.run(main())
    finally:
        requests.put(None)
        proc.join(120)
    assert proc.exitcode == 0
    assert outs == [r.token_ids for r in ref]
    if local_prefill_max_tokens:
        assert counters["pdserve_local_prefills_total"] == 1
        assert counters["pdserve_kv_transfer_blocks_skipped_total"] == 0  # one import, whole
    else:
        assert counters["pdserve_kv_transfer_blocks_skipped_total"] == 4  # past the prefix
    assert stats.pages_used == 0

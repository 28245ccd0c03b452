"""Page copies between two steps queue on the stream: the host does not wait for the step in
flight (with overlapped scheduling one always is). Checked with the GPU held busy by a kernel
of about a second: each call must return while that kernel still runs, and its copy must be
right once the stream has drained. A prompt's exported KV does not wait for that step on the
device either: it is read out on the engine's export stream."""

from __future__ import annotations

import pytest
import torch

from engine.config import EngineConfig, ModelConfig
from engine.host_copy import index_tensor
from engine.kv_pool import KVPool
from engine.llm_engine import Engine
from engine.model_arch import ModelArch
from engine.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

ARCH = ModelArch("LlamaForCausalLM", vocab_size=64, hidden_size=64, intermediate_size=128,
                 num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5,
                 rope_theta=10000.0)


def _busy_gpu(seconds: float = 2.0) -> None:
    """Queues a kernel that spins for about `seconds` (far longer than any host call here)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1_000_000)  # loads the kernel, so that the timing below is its own
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    end.synchronize()
    torch.cuda._sleep(int(10_000_000 * 1000 * seconds / start.elapsed_time(end)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_page_copies_do_not_wait_for_the_gpu(dtype):
    pool = KVPool(ARCH, num_pages=8, page_size=4, dtype=dtype, device="cuda")
    data = torch.randn(pool.export_shape(3), device="cuda").to(dtype)
    stream = torch.cuda.current_stream()
    pool.write_pages([0], data[:, :1])  # first use: pinned-memory pool, kernels loaded
    pool.read_pages([0])
    torch.cuda.synchronize()

    _busy_gpu()
    pool.write_pages([5, 1, 6], data)
    assert not stream.query(), "write_pages waited for the GPU"
    out = pool.read_pages([1, 6])
    assert not stream.query(), "read_pages waited for the GPU"
    idx = index_tensor([3, 2], torch.device("cuda"))
    assert not stream.query(), "index_tensor waited for the GPU"

    torch.cuda.synchronize()
    assert idx.tolist() == [3, 2]
    as_f = torch.float32
    assert torch.equal(out.to(as_f), data[:, 1:].to(as_f))
    assert torch.equal(pool.kv[:, 5].to(as_f), data[:, 0].to(as_f))


def test_an_export_does_not_wait_for_the_step_launched_after_its_prompt(tiny_llama, monkeypatch):
    """Overlapped scheduling launches the next step before it collects the one that ended a
    prompt, so a copy of the prompt's pages on the engine's stream would queue behind that step
    (a whole prefill step, ~0.4 s at 16K tokens on one H200)."""
    engine = Engine(ModelConfig(tiny_llama, device="cuda", dtype="float32"),
                    EngineConfig(page_size=16, num_pages=64, overlap_scheduling="on",
                                 attention_backend="torch"))
    engine.add_request(list(range(10, 50)), SamplingParams(max_tokens=1, temperature=0.0),
                       request_id="a", kv_export_from=0)
    engine.add_request(list(range(60, 80)), SamplingParams(max_tokens=8, temperature=0.0,
                                                           ignore_eos=True), request_id="b")
    assert engine.step() == []  # both prompts launched, nothing collected yet
    (req_a,) = [r for r in engine.scheduler.running if r.request_id == "a"]
    pages = list(req_a.block_table)
    assert len(pages) == 3

    launch = engine.runner.launch

    def launch_then_hold_the_gpu(batch):
        launched = launch(batch)
        _busy_gpu()  # the step in flight, made long
        return launched

    monkeypatch.setattr(engine.runner, "launch", launch_then_hold_the_gpu)
    outputs = engine.step()  # launches b's decode step, then collects the prompts' step
    (out_a,) = [o for o in outputs if o.request_id == "a"]
    assert out_a.finished and out_a.kv is not None
    engine.export_stream.synchronize()  # the export's own stream: the copy is done...
    assert not torch.cuda.current_stream().query(), "the export waited for the step in flight"
    torch.cuda.synchronize()
    assert torch.equal(out_a.kv.data, engine.pool.read_pages(pages))  # ...and exact

"""Page copies between two steps queue on the stream: the host does not wait for the step in
flight (with overlapped scheduling one always is). Checked with the GPU held busy by a kernel
of about a second: each call must return while that kernel still runs, and its copy must be
right once the stream has drained."""

from __future__ import annotations

import pytest
import torch

from engine.host_copy import index_tensor
from engine.kv_pool import KVPool
from engine.model_arch import ModelArch

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

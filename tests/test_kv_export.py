"""KVExporter: a finished prefill's prompt pages from `kv_export_from` on, copied out of the pool
with the chain hashes of all the prompt's full blocks; the pages themselves stay the caller's
to free. With a layerwise stream, the copy it already holds is handed on; a stream whose
layers never came (the step ran without the hook) is filled from the same copy."""

from __future__ import annotations

import torch

from engine.block_hash import block_hashes
from engine.kv_export import KVExporter
from engine.kv_pool import KVPool
from engine.kv_stream import LayerwiseExport
from engine.model_arch import ModelArch
from engine.request import Request
from engine.sampling_params import SamplingParams

ARCH = ModelArch("LlamaForCausalLM", vocab_size=64, hidden_size=64, intermediate_size=128,
                 num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5,
                 rope_theta=10000.0)
PS = 4


def _pool_and_request(kv_stream=None) -> tuple[KVPool, Request]:
    pool = KVPool(ARCH, num_pages=8, page_size=PS, dtype=torch.float32, device="cpu")
    pool.write_pages(list(range(8)), torch.randn(pool.export_shape(8)))
    # 10 prompt tokens: blocks 0 and 1 full, block 2 partial; one output token.
    req = Request("r", list(range(20, 30)), SamplingParams(max_tokens=1),
                  block_table=[5, 2, 7], kv_export_from=1, kv_stream=kv_stream)
    req.output_token_ids = [3]
    return pool, req


def test_an_export_is_a_copy_of_the_pages_from_its_first_block_with_every_full_blocks_hash():
    pool, req = _pool_and_request()
    before = pool.kv.clone()
    kv = KVExporter(pool).export(req)
    assert kv.first_block == 1
    assert torch.equal(kv.data, pool.read_pages([2, 7]))
    assert kv.block_hashes == block_hashes(list(range(20, 30)), PS)
    assert len(kv.block_hashes) == 2  # the partial block has no hash
    kv.data.zero_()  # a copy of its own: the pool is untouched
    assert torch.equal(pool.kv, before)
    assert req.block_table == [5, 2, 7]  # nothing freed here: the caller releases the pages


def test_a_layerwise_export_hands_on_its_copy_or_is_filled_from_the_pool():
    pool, req = _pool_and_request(LayerwiseExport(first_block=1, num_pages=2))
    kv = KVExporter(pool).export(req)  # no layer came: filled
    assert req.kv_stream.layers_ready == ARCH.num_layers
    assert kv.data is req.kv_stream.data
    assert torch.equal(kv.data, pool.read_pages([2, 7]))

    pool, req = _pool_and_request(LayerwiseExport(first_block=1, num_pages=2))
    streamed = torch.full(pool.export_shape(2), 7.0)
    req.kv_stream.fill(streamed)  # every layer published during the last prompt step
    assert KVExporter(pool).export(req).data is streamed


def test_off_cuda_there_is_no_export_stream():
    pool, _ = _pool_and_request()
    assert KVExporter(pool).stream is None

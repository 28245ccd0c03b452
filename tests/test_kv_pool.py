"""KVPool page copies: pages move as slices per run of consecutive ids, or through an index when
they are too scattered; either way the same bytes land in the same pages."""

from __future__ import annotations

import pytest
import torch

from engine.kv_pool import MAX_RUN_COPIES, KVPool, page_runs
from engine.model_arch import ModelArch

ARCH = ModelArch("LlamaForCausalLM", vocab_size=64, hidden_size=64, intermediate_size=128,
                 num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5,
                 rope_theta=10000.0)


def test_page_runs():
    assert page_runs([]) == []
    assert page_runs([7]) == [(7, 1)]
    assert page_runs([3, 4, 5, 9, 10, 2]) == [(3, 3), (9, 2), (2, 1)]
    assert page_runs([5, 4]) == [(5, 1), (4, 1)]  # runs ascend: a descending pair is two


@pytest.mark.parametrize("pages", [
    [4, 5, 6],  # one run: one slice copy
    [9, 10, 2, 3, 0],  # three runs
    [11, 1, 7, 3, 5, 9],  # more runs than MAX_RUN_COPIES: through an index tensor
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float8_e4m3fn])
def test_written_pages_read_back_and_nothing_else_changes(pages, dtype):
    assert (len(page_runs(pages)) > MAX_RUN_COPIES) == (len(pages) == 6)
    pool = KVPool(ARCH, num_pages=12, page_size=4, dtype=dtype, device="cpu")
    data = torch.randn(pool.export_shape(len(pages))).to(dtype)
    pool.write_pages(pages, data)
    as_f = torch.float32
    for i, page in enumerate(pages):
        assert torch.equal(pool.kv[:, page].to(as_f), data[:, i].to(as_f))
    untouched = [p for p in range(pool.num_pages + 1) if p not in pages]
    assert not pool.kv[:, untouched].to(as_f).any()
    out = pool.read_pages(pages)
    assert out.dtype == dtype and torch.equal(out.to(as_f), data.to(as_f))
    assert out.untyped_storage().data_ptr() != pool.kv.untyped_storage().data_ptr()


def test_no_pages_read_as_an_empty_copy_and_write_nothing():
    pool = KVPool(ARCH, num_pages=4, page_size=4, dtype=torch.float32, device="cpu")
    out = pool.read_pages([])
    assert tuple(out.shape) == pool.export_shape(0)
    pool.write_pages([], out)
    assert not pool.kv.any()
